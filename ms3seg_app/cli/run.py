"""Entry point ``ms3seg`` (also ``python -m ms3seg_app``).

Exit codes: 0 every selected FLAIR succeeded; 1 some failed (the others' results are
kept); 2 usage error; 70 (EX_SOFTWARE) internal error before any FLAIR ran.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

LOGGER = logging.getLogger("ms3seg")
IMPORTANT = 25
logging.addLevelName(IMPORTANT, "IMPORTANT")
EX_SOFTWARE = 70


def _setup_logging(verbose: int, quiet: int, log_file: Path | None) -> None:
    level = max(logging.DEBUG, min(logging.ERROR, IMPORTANT - 10 * verbose + 10 * quiet))
    if verbose == 1:
        level = logging.INFO
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("ms3seg")
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(level)
    h.setFormatter(fmt)
    root.addHandler(h)
    try:  # nipype logs every node at INFO; keep that for -vv
        from nipype import config as ncfg, logging as nlogging

        ncfg.set("logging", "workflow_level", "INFO" if verbose >= 2 else "WARNING")
        ncfg.set("logging", "interface_level", "INFO" if verbose >= 2 else "WARNING")
        nlogging.update_logging(ncfg)
    except ImportError:  # pragma: no cover
        pass
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def select_device(device: str, omp_threads: int) -> str:
    """Configure TensorFlow's device before it is imported; return what is used.

    ``gpu`` without a visible GPU falls back to the CPU with a warning.
    """
    if omp_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(omp_threads)
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(omp_threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "gpu"
    if device == "gpu":
        LOGGER.warning("--device gpu asked for, but TensorFlow sees no GPU: running on the CPU")
    return "cpu"


def validate_bids(bids_dir: Path) -> None:
    """Run the official BIDS validator (``bids-validator-deno`` from PyPI).

    Raises
    ------
    InputDataError
        If the dataset is invalid (the validator's report is in the message).
    """
    from ..exceptions import InputDataError

    here = Path(sys.executable).parent  # the environment ms3seg is installed in, even if not on PATH
    exe = (shutil.which("bids-validator-deno") or shutil.which("bids-validator-deno", path=str(here))
           or shutil.which("bids-validator"))
    if exe is None:
        LOGGER.warning("BIDS validator not found; skipping validation (pip install bids-validator-deno)")
        return
    env = dict(os.environ)
    env.setdefault("DENO_DIR", str(Path(tempfile.gettempdir()) / "ms3seg-deno"))
    env.setdefault("DENO_NO_UPDATE_CHECK", "1")
    try:
        res = subprocess.run([exe, str(bids_dir), "--ignoreWarnings"], capture_output=True, text=True,
                             timeout=600, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOGGER.warning("the BIDS validator could not run (%s); continuing without validation", exc)
        return
    if res.returncode != 0:
        raise InputDataError(f"{bids_dir} is not a valid BIDS dataset:\n{res.stdout[-3000:]}{res.stderr[-2000:]}\n"
                             "Fix the dataset, or pass --skip-bids-validation.")


def main(argv=None) -> int:
    from .parser import parse_args

    opts = parse_args(argv)  # usage errors exit with 2 here
    run_uuid = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    log_dir = opts.output_dir / "logs"
    try:
        opts.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"ms3seg: cannot create output_dir {opts.output_dir}: {exc}", file=sys.stderr)
        return 2
    _setup_logging(opts.verbose, opts.quiet, log_dir / f"ms3seg_{opts.analysis_level}_{run_uuid}.log")
    from ..exceptions import MS3SegError

    try:
        if opts.analysis_level == "group":
            from ..group import run_group

            run_group(opts.bids_dir, opts.output_dir)
            return 0
        return _participant(opts, run_uuid)
    except MS3SegError as exc:
        LOGGER.error("%s", exc)
        return 1
    except Exception:  # internal error: full traceback to the log and stderr
        LOGGER.error("internal error:\n%s", traceback.format_exc())
        return EX_SOFTWARE


def _participant(opts, run_uuid: str) -> int:
    from .. import __version__
    from ..bids import collect_inputs, load_filters
    from ..derivatives import atomic_write_json, write_top_level

    if not opts.skip_bids_validation:
        validate_bids(opts.bids_dir)
    inputs, without_flair = collect_inputs(opts.bids_dir, opts.participant_label, opts.session_label,
                                           load_filters(opts.bids_filter_file))
    device = select_device(opts.device, opts.omp_nthreads)
    from ..model.predict import get_predictor
    from ..participant import process_flair

    predictor = get_predictor(opts.model, allow_unverified=opts.allow_unverified_model, tta=not opts.no_tta)
    container = None
    if os.environ.get("MS3SEG_CONTAINER"):
        container = {"Type": os.environ.get("MS3SEG_CONTAINER"), "Tag": f"ms3seg:{__version__}"}
    write_top_level(opts.output_dir, container)
    work = opts.work_dir or Path(tempfile.gettempdir()) / f"ms3seg_work_{run_uuid}"
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(opts.output_dir / "logs" / f"config-{run_uuid}.json", {
        "version": __version__, "argv": sys.argv, "device": device, "model": str(predictor.weights),
        "model_sha256": predictor.sha256, "bids_dir": str(opts.bids_dir), "inputs": [str(i.path) for i in inputs]})
    LOGGER.log(IMPORTANT, "ms3seg-app %s: %d FLAIR(s), model %s (sha256 %s...), device %s", __version__,
               len(inputs), predictor.card.get("name"), predictor.sha256[:12], device)
    if opts.omp_nthreads <= 0 and opts.nprocs > 1:  # share the cores between parallel FLAIRs
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // opts.nprocs))
    failed, done = [], []
    for sub in without_flair:
        msg = "no FLAIR found (sub-%s/[ses-*/]anat/*_FLAIR.nii[.gz]); participant skipped" % sub
        LOGGER.warning("sub-%s: %s", sub, msg)
        if opts.participant_label:  # explicitly selected: it did not succeed
            failed.append((f"sub-{sub}", msg))
    kwargs = dict(output_dir=opts.output_dir, work_dir=work, skull_strip=opts.skull_strip, n4=opts.n4,
                  reports=not opts.no_reports, container=container, model=opts.model,
                  allow_unverified=opts.allow_unverified_model, tta=not opts.no_tta)
    if opts.nprocs > 1 and len(inputs) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn, not fork: TensorFlow is not fork-safe; each worker loads the model once
        with cf.ProcessPoolExecutor(max_workers=min(opts.nprocs, len(inputs)),
                                    mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_process_one, fi, kwargs, opts.verbose, opts.quiet): fi for fi in inputs}
            for fut in cf.as_completed(futs):
                prefix, err, tb = fut.result()
                _record(prefix, err, tb, done, failed, opts.output_dir, run_uuid)
    else:
        try:
            from tqdm import tqdm

            it = tqdm(inputs, disable=not sys.stderr.isatty(), unit="FLAIR")
        except ImportError:  # pragma: no cover
            it = inputs
        for fi in it:
            prefix, err, tb = _process_one(fi, kwargs, None, None, predictor)
            _record(prefix, err, tb, done, failed, opts.output_dir, run_uuid)
    if opts.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    LOGGER.log(IMPORTANT, "finished: %d succeeded, %d failed%s", len(done), len(failed),
               "".join(f"\n  {p}: {m}" for p, m in failed))
    return 1 if failed else 0


def _process_one(fi, kwargs: dict, verbose, quiet, predictor=None):
    """Process one FLAIR; never raises: returns (prefix, error message or None, traceback)."""
    if verbose is not None:  # in a worker process
        _setup_logging(verbose, quiet, None)
    try:
        from ..model.predict import get_predictor
        from ..participant import process_flair

        if predictor is None:
            predictor = get_predictor(kwargs["model"], kwargs["allow_unverified"], kwargs["tta"])
        process_flair(fi, predictor, **kwargs)
        return fi.prefix, None, None
    except Exception as exc:  # one FLAIR's failure never loses the others
        return fi.prefix, str(exc), traceback.format_exc()


def _record(prefix, err, tb, done, failed, output_dir: Path, run_uuid: str) -> None:
    if err is None:
        done.append(prefix)
        return
    failed.append((prefix, err))
    crash = output_dir / "logs" / f"crash-{prefix}-{run_uuid}.txt"
    crash.write_text(tb or err)
    LOGGER.error("%s FAILED: %s (traceback in %s)", prefix, err, crash)


if __name__ == "__main__":
    sys.exit(main())
