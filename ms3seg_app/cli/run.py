"""Entry point ``ms3seg`` (also ``python -m ms3seg_app``).

Exit codes: 0 every selected FLAIR succeeded; 1 some failed (the others' results are
kept; one line each on the terminal, tracebacks in ``output_dir/logs/``); 2 usage
error; 70 (EX_SOFTWARE) internal error before any FLAIR ran; 143 stopped by SIGTERM
(:class:`Terminated`).

The terminal shows only ms3seg-app's own lines at the default verbosity. TensorFlow,
absl and CUDA write to the process's standard-error file descriptor from C++, where
``TF_CPP_MIN_LOG_LEVEL`` does not reach every message; so, below ``-vv``, file
descriptor 2 is pointed at ``logs/native_<run>.log`` for the whole run and the console
handler writes to a duplicate of the original descriptor.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

LOGGER = logging.getLogger("ms3seg")
IMPORTANT = 25
logging.addLevelName(IMPORTANT, "IMPORTANT")
EX_SOFTWARE = 70


#: Exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process it ended)
EX_TERMINATED = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """SIGTERM reached the run (a scheduler's time limit or preemption, ``docker stop``).

    Raised in the main thread by :func:`_on_sigterm` so that the run unwinds as after any
    error: worker processes are stopped, the temporary work folder is removed, the log says
    so; outputs are written atomically, so the FLAIRs not finished have none and the next run
    redoes them. A :class:`SystemExit`, so ``except Exception`` (one FLAIR's failure) does
    not take it for a FLAIR's error. Without a handler Python dies at once on SIGTERM, and as
    a container's PID 1 (``docker run`` without ``--init``) it ignores it.
    """


def _on_sigterm(signum, frame) -> None:
    # a second SIGTERM (SLURM signals every process of the task) must not interrupt the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(EX_TERMINATED)


def ensure_tempdir(work_dir: Path | None) -> None:
    """Make sure temporary files have a writable folder, before anything needs one.

    Python's (and TensorFlow's, the BIDS validator's) temporary files go to ``TMPDIR``, else
    ``/tmp``, ``/var/tmp`` or the working folder (:func:`tempfile.gettempdir`); in a read-only
    container (``docker run --read-only`` without ``--tmpfs /tmp``) none may be writable.
    Then, with ``-w``, ``TMPDIR`` is set to ``work_dir/tmp``.

    Raises
    ------
    UsageError
        No writable temporary folder and no ``-w``; the message says what to do.
    """
    from ..exceptions import UsageError

    try:
        tempfile.gettempdir()
        return
    except FileNotFoundError as exc:
        if work_dir is None:
            raise UsageError(f"no writable folder for temporary files ({exc}); set TMPDIR to a writable "
                              "folder or give -w WORK_DIR (docker run --read-only: add --tmpfs /tmp)") from None
    tmp = Path(work_dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # gettempdir() looks again, at TMPDIR first
    LOGGER.info("no writable TMPDIR, /tmp or /var/tmp: temporary files go to %s", tempfile.gettempdir())


def _setup_logging(verbose: int, quiet: int, log_file: Path | None, console=None) -> None:
    """Console handler (plain lines at the default level) plus a DEBUG log file."""
    level = max(logging.DEBUG, min(logging.ERROR, IMPORTANT - 10 * verbose + 10 * quiet))
    if verbose == 1:
        level = logging.INFO
    root = logging.getLogger("ms3seg")
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    h = logging.StreamHandler(console or sys.stderr)
    h.setLevel(level)
    h.setFormatter(logging.Formatter("%(message)s" if verbose == 0 else
                                     "%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        root.addHandler(fh)
        logging.captureWarnings(True)  # Python warnings of TensorFlow/Keras go to the file only
        pyw = logging.getLogger("py.warnings")
        pyw.handlers[:] = [fh]
        pyw.propagate = False


def _redirect_native_stderr(native_log: Path):
    """Point fd 2 at ``native_log``; return a text stream on the original stderr."""
    native_log.parent.mkdir(parents=True, exist_ok=True)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(native_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)
    return console


def usable_cpus() -> int:
    """CPUs this process may use, at least 1: the least of the machine's CPUs, the process's CPU
    affinity (a SLURM task's binding, ``taskset``, ``docker --cpuset-cpus``), its cgroup's CPU
    quota (``docker --cpus``, Kubernetes limits) and ``LOKY_MAX_CPU_COUNT`` if set.

    ``os.cpu_count()`` counts the whole node: a 2-CPU array task on a 64-core node would run 64
    threads per FLAIR. By loky's ``cpu_count`` (vendored in joblib; ``joblib.cpu_count`` itself
    answers 1 where joblib's multiprocessing is off, e.g. ``JOBLIB_MULTIPROCESSING=0`` or no
    ``/dev/shm``), imported here only: ~0.07 s, which a run given ``--omp-nthreads`` does not pay.
    """
    from joblib.externals.loky import cpu_count

    return max(1, int(cpu_count()))


def select_device(device: str, omp_threads: int, query: bool = True) -> str:
    """Configure TensorFlow's device and threads before it is imported; return what is used.

    ``omp_threads`` > 0 sets the threads of TensorFlow (intra-op; inter-op 1), OpenMP and ITK
    (ANTsPy: ``--n4``, ANTs co-registration; read when ANTsPy is imported, which happens later).
    ``gpu`` without a visible GPU falls back to the CPU with a warning. A GPU's memory is taken
    as needed (``set_memory_growth``), not all at once, so that ``--nprocs`` workers (and
    other jobs) can share it. ``query=False`` leaves ``auto`` and ``gpu`` undecided (returned
    as given) without importing TensorFlow: the main process of an ``--nprocs`` run, whose
    workers decide each (importing TensorFlow only to list GPUs took 0.6 GB there).
    """
    if omp_threads > 0:
        for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
            os.environ[var] = str(omp_threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if not query:
        return device
    import_tensorflow()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError as exc:  # raised once TensorFlow has initialised the GPU
                LOGGER.debug("GPU memory growth not set: %s", exc)
        return "gpu"
    if device == "gpu":
        LOGGER.warning("--device gpu asked for, but TensorFlow sees no GPU: running on the CPU")
    return "cpu"


def import_tensorflow() -> None:
    """Import TensorFlow and Keras (each imports the other) without scikit-learn; device and
    threads first (:func:`select_device`).

    Keras imports scikit-learn, when it is installed (antspyx installs it), for its
    scikit-learn wrappers (``keras.wrappers``), which ms3seg never uses; that took 0.2-0.4 s
    of every process's start-up (``python -X importtime``, 2 cores, 2026-12-02). While they
    are imported, scikit-learn is marked absent (``sys.modules[name] = None`` makes its import
    raise ImportError: the import system's documented behaviour), so Keras defines its
    wrappers without it; the mark is removed afterwards, so a later ``import sklearn`` works
    (ANTsPy imports it: with ``--n4`` or ANTs co-registration its cost comes later instead).
    Nothing is changed when TensorFlow, Keras or scikit-learn is already imported. No other
    thread may import scikit-learn meanwhile (the CLI calls it in its start-up thread while
    the main thread runs the BIDS validator's subprocess).
    """
    if any(m in sys.modules for m in ("tensorflow", "keras", "sklearn")):
        return
    sys.modules["sklearn"] = None
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        if sys.modules.get("sklearn", False) is None:  # our mark, not a module imported meanwhile
            del sys.modules["sklearn"]


def validate_bids(bids_dir: Path) -> None:
    """Run the official BIDS validator (``bids-validator-deno`` from PyPI).

    Raises
    ------
    InputDataError
        If the dataset is invalid (the validator's report is in the message).
    """
    import subprocess

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

    opts = parse_args(argv)  # usage errors (paths, labels, filter file) exit with 2 here
    run_uuid = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    log_dir = opts.output_dir / "logs"
    try:
        opts.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"ms3seg: cannot create output_dir {opts.output_dir}: {exc}", file=sys.stderr)
        return 2
    stem = f"ms3seg_{opts.analysis_level}_{run_uuid}"
    console = _redirect_native_stderr(log_dir / f"native_{stem}.log") if opts.verbose < 2 else None
    _setup_logging(opts.verbose, opts.quiet, log_dir / f"{stem}.log", console)
    from ..exceptions import MS3SegError, UsageError, is_system_error

    # only where Python may set it (the main thread) and where the handler there was set from
    # Python (None: set by an embedding program, which keeps it)
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            ensure_tempdir(opts.work_dir)
        except UsageError as exc:
            LOGGER.error("ms3seg: %s", exc)
            return 2
        if opts.analysis_level == "group":
            return _group(opts)
        return _participant(opts, run_uuid, console)
    except Terminated:
        left = ("FLAIRs not finished have no outputs" if opts.analysis_level == "participant" else
                "each group table is whole, but some may still be the previous group run's")
        LOGGER.error("ms3seg: stopped by SIGTERM (a time limit, preemption or docker stop): %s; run the same "
                     "command again", left)
        return EX_TERMINATED
    except MS3SegError as exc:
        LOGGER.error("ms3seg: %s", exc)
        return 1
    except Exception as exc:  # internal error: full traceback to the log, one line to the terminal
        LOGGER.debug("internal error:\n%s", traceback.format_exc())
        if is_system_error(exc):
            LOGGER.error("ms3seg: %s", _error_line(exc))  # the machine's state, not a bug
            return 1
        LOGGER.error("ms3seg: internal error (%s); this is a bug: please report it with %s",
                     traceback.format_exc(limit=0).strip().splitlines()[-1], log_dir / f"{stem}.log")
        return EX_SOFTWARE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        logging.shutdown()
        if console is not None:  # give fd 2 back (main() may run inside a longer process, e.g. tests)
            sys.stderr.flush()
            os.dup2(console.fileno(), 2)
            console.close()


def command(argv=None) -> int:
    """The ``ms3seg`` command (and ``python -m ms3seg_app``): :func:`main`, then a fast exit.

    At exit CPython tears down every module and collects every object; with TensorFlow and
    Keras loaded (about 4000 modules) that took 0.9-1.0 s per process on 2 cores (measured
    2026-12-02), paid by every cluster job. ``gc.freeze()`` moves the objects alive at the end
    of the run into the permanent generation, which the collections at exit skip: the process
    ends in about 0.1 s. Nothing is lost: the outputs are closed, written atomically, and
    atexit handlers (logging's flush, temporary folders) still run. :func:`main` itself,
    which tests and other programs call in-process, leaves the collector alone.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        :func:`main`'s exit status.
    """
    import gc

    code = main(argv)
    gc.freeze()
    return code


def _group(opts) -> int:
    import pandas as pd

    from ..derivatives import GROUP_OUTPUTS
    from ..group import run_group

    run_group(opts.bids_dir, opts.output_dir, report=not opts.no_reports)
    out = opts.output_dir
    vol = pd.read_csv(out / GROUP_OUTPUTS["volumes"], sep="\t")
    qc_path = out / GROUP_OUTPUTS["qc"]
    qc = pd.read_csv(qc_path, sep="\t") if qc_path.exists() and qc_path.stat().st_size else pd.DataFrame()
    n_part = vol["participant_id"].nunique() if "participant_id" in vol else len(vol)
    LOGGER.log(IMPORTANT, "group: read %d FLAIR result(s) of %d participant(s)", len(vol), n_part)
    if len(qc):
        kinds = qc["problem"].astype(str).str.split(r"[:(]").str[0].str.strip()
        LOGGER.log(IMPORTANT, "group: %d QC flag(s): %s (see %s)", len(qc),
                   ", ".join(f"{k} x{v}" for k, v in kinds.value_counts().items()), qc_path)
    else:
        LOGGER.log(IMPORTANT, "group: no QC flags")
    report = out / GROUP_OUTPUTS["report"]
    if not opts.no_reports:
        LOGGER.log(IMPORTANT, "group: tables %s; report %s", out / GROUP_OUTPUTS["volumes"], report)
        return 0
    LOGGER.log(IMPORTANT, "group: tables %s; no report (--no-reports)", out / GROUP_OUTPUTS["volumes"])
    if report.exists():
        LOGGER.warning("group: %s is from an earlier group run and does not match these tables; "
                       "delete it, or run the group level without --no-reports", report)
    return 0


def _participant(opts, run_uuid: str, console) -> int:
    from .. import __version__
    from ..bids import collect_inputs, load_filters
    from ..derivatives import atomic_write_json, output_prefix, write_top_level, write_used_card
    from ..model.card import load_card, sha256_file
    from ..participant import RunOptions, is_complete

    startup: dict[str, float] = {}  # run-level seconds, logged as STARTUP_SECONDS (benchmarks read it)
    t0 = time.perf_counter()
    inputs, without_flair = collect_inputs(opts.bids_dir, opts.participant_label, opts.session_label,
                                           load_filters(opts.bids_filter_file))
    startup["indexing"] = time.perf_counter() - t0
    card = load_card(opts.model)  # reads and validates the card: no TensorFlow yet
    options = RunOptions(skull_strip=opts.skull_strip, n4=opts.n4, tta=not opts.no_tta, reports=not opts.no_reports,
                         members=tuple(opts.members) if opts.members else None, crop=opts.crop)
    container = None
    if os.environ.get("MS3SEG_CONTAINER"):
        container = {"Type": os.environ.get("MS3SEG_CONTAINER"), "Tag": f"ms3seg:{__version__}"}
    failed, done = [], []
    # what narrowed the search: a participant may have FLAIRs, none of them selected
    narrowed = ([f"session label {' '.join(opts.session_label)}"] if opts.session_label else []) + (
        [f"the filters of {opts.bids_filter_file}"] if opts.bids_filter_file else [])
    for sub in without_flair:
        where = f"sub-{sub}/[ses-*/]anat/*_FLAIR.nii[.gz]"
        msg = (f"no FLAIR matches the {' and '.join(narrowed)} ({where}); participant skipped" if narrowed
               else f"no FLAIR found ({where}); participant skipped")
        LOGGER.warning("sub-%s: %s", sub, msg)
        if opts.participant_label:  # explicitly selected: it did not succeed
            failed.append((f"sub-{sub}", msg))
    todo = []
    t0 = time.perf_counter()
    for fi in inputs:  # resume check first: nothing heavy is imported for a complete rerun
        prefix = output_prefix(fi.entities)
        if getattr(fi, "error", None):
            _report_failure(prefix, fi.error, None, failed, opts.output_dir, run_uuid)
        else:
            try:
                sha = sha256_file(fi.path)  # once per FLAIR: resume check here, sidecar in process_flair
            except OSError as exc:  # e.g. a DataLad/git-annex link whose content was not fetched
                from ..stages.checks import unreadable_input

                _report_failure(prefix, unreadable_input(fi.path, exc), None, failed, opts.output_dir, run_uuid)
                continue
            if is_complete(fi, opts.output_dir, card, options, sha):
                LOGGER.log(IMPORTANT, "%s: skipped (outputs complete)", prefix)
                done.append(prefix)
            else:
                todo.append((fi, sha))
    startup["resume_check"] = time.perf_counter() - t0
    LOGGER.log(IMPORTANT, "ms3seg-app %s: %d FLAIR(s) selected, %d to process; model %s (%s)",
               __version__, len(inputs), len(todo), card.name,
               f"{len(card.members)} member(s)" if options.members is None else
               f"member(s) {', '.join(map(str, options.members))} of {len(card.members)}")
    nprocs = max(1, min(opts.nprocs, len(todo)))
    threads = opts.omp_nthreads
    if todo and threads <= 0:  # only when there is work: a complete rerun imports nothing it does not need
        threads = max(1, usable_cpus() // nprocs)
    if todo:
        # TensorFlow's import (3-5 s) runs in a thread while the BIDS validator (a 2-3 s
        # subprocess) checks the dataset: the process waits once, not twice. An invalid dataset
        # still waits for the thread (leaving the pool joins it) before exiting.
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(1, thread_name_prefix="ms3seg-startup") as pool:
            warm_up = pool.submit(_warm_up, opts, threads, nprocs)
            if not opts.skip_bids_validation:  # a rerun with nothing left to do skips the validator
                t0 = time.perf_counter()
                validate_bids(opts.bids_dir)
                startup["validation"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            device, warm_seconds = warm_up.result()
            startup["waiting_for_tensorflow"] = time.perf_counter() - t0
        startup.update(warm_seconds)
        job = dict(model=opts.model, allow_unverified=opts.allow_unverified_model, options=options,
                   output_dir=opts.output_dir, bids_dir=opts.bids_dir)
        if nprocs == 1:
            # the networks load in a thread of their own (1-2 s) from when the first FLAIR is
            # sliced, while it is brain-extracted; its inference waits for them. The members'
            # sha256 are checked here: a tampered model stops the run before anything is written.
            t0 = time.perf_counter()
            _predictor(job, background=True)
            startup["model_check"] = time.perf_counter() - t0
    write_top_level(opts.output_dir, card.classes, opts.bids_dir, container)
    write_used_card(opts.output_dir, card)
    if todo:
        LOGGER.debug("STARTUP_SECONDS %s", json.dumps({k: round(v, 3) for k, v in startup.items()}))
        atomic_write_json(opts.output_dir / "logs" / f"config-{run_uuid}.json", {
            "version": __version__, "argv": sys.argv, "device": device, "threads_per_flair": threads,
            "nprocs": nprocs, "model_card": str(card.path), "model_sha256": card.sha256,
            "bids_dir": str(opts.bids_dir), "inputs": [str(fi.path) for fi, _ in todo]})
        work = job["work_dir"] = opts.work_dir or Path(tempfile.mkdtemp(prefix=f"ms3seg_work_{run_uuid}_"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            if nprocs > 1:
                _run_pool(todo, job, nprocs, threads, opts, done, failed, run_uuid)
            else:
                from tqdm import tqdm

                stream = console or sys.stderr
                for fi, sha in tqdm(todo, disable=not stream.isatty(), unit="FLAIR", file=stream, leave=False):
                    outcome = _process_one(fi, job, sha)
                    # networks that failed to load fail the run (ModelError, exit 1), not each FLAIR
                    _predictor(job).models
                    _record(*outcome, done, failed, opts.output_dir, run_uuid)
        finally:
            if opts.work_dir is None:
                shutil.rmtree(work, ignore_errors=True)
    LOGGER.log(IMPORTANT, "finished: %d succeeded, %d failed%s", len(done), len(failed),
               "".join(f"\n  {p}: {m}" for p, m in failed))
    if done:
        import shlex

        LOGGER.log(IMPORTANT, "outputs: %s (reports: %s); next: ms3seg %s %s group", opts.output_dir,
                   opts.output_dir / "sub-*.html", shlex.quote(str(opts.bids_dir)), shlex.quote(str(opts.output_dir)))
    return 1 if failed else 0


def _run_pool(todo: list, job: dict, nprocs: int, threads: int, opts, done: list, failed: list,
              run_uuid: str) -> None:
    """Process ``todo`` in ``nprocs`` worker processes; a worker that dies fails its FLAIR, not the run.

    When a worker process dies (the out-of-memory killer's SIGKILL, a crash in native code),
    :mod:`concurrent.futures` marks the whole pool broken and every FLAIR not yet finished
    fails with ``BrokenProcessPool``. The FLAIR the dead worker was on is reported failed
    (one line and a crash log, as any failed FLAIR: :func:`_report_failure`); a fresh pool
    then processes the FLAIRs that had not finished (:func:`_sort_out_broken_pool` says which
    is which).

    Parameters
    ----------
    todo : list of (FlairInput, str)
        The FLAIRs to process, with their sha256.
    job : dict
        What :func:`_process_one` needs; ``inflight_dir`` is added here.
    nprocs : int
        Worker processes (at least 2).
    threads : int
        Threads per worker.
    opts : argparse.Namespace
        The command line (device, verbosity, ``output_dir``).
    done, failed : list
        Appended to: the prefixes that succeeded; (prefix, message) of those that failed.
    run_uuid : str
        Names the crash logs.
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    from ..derivatives import output_prefix

    # each worker leaves <prefix>.pid here while it processes a FLAIR: after a break it tells
    # the FLAIRs that were running (and on which worker) from those that never started
    inflight = job["inflight_dir"] = Path(job["work_dir"]) / f"inflight-{run_uuid}"
    inflight.mkdir(parents=True, exist_ok=True)
    breaks: dict[str, int] = {}
    remaining = list(todo)
    ctx = mp.get_context("spawn")
    try:
        while remaining:
            pending, procs = {}, None
            # the workers' log records, handled here (console and run log); a fresh queue per pool:
            # a worker killed while writing to one may leave it locked or corrupt
            log_queue, forwarder = _log_forwarder(ctx)
            progress_before = len(done) + len(failed) + sum(breaks.values())
            # spawn, not fork: TensorFlow is not fork-safe; each worker loads the model once and
            # runs `threads` threads, so the workers share the cores instead of each taking all
            try:
                with cf.ProcessPoolExecutor(max_workers=min(nprocs, len(remaining)), mp_context=ctx,
                                            initializer=_init_worker,
                                            initargs=(threads, opts.device, log_queue)) as pool:
                    # private, read only for the dead worker's exit status; without it (another Python)
                    # no FLAIR can be blamed for sure and each running one is retried once instead
                    procs = getattr(pool, "_processes", None)
                    submitted = 0
                    try:
                        for fi, sha in remaining:  # a worker may die while later FLAIRs are submitted
                            pending[pool.submit(_process_one, fi, job, sha)] = (fi, sha)
                            submitted += 1
                        for fut in cf.as_completed(list(pending)):
                            outcome = fut.result()
                            del pending[fut]
                            _record(*outcome, done, failed, opts.output_dir, run_uuid)
                    except BrokenProcessPool:
                        pass  # leaving the block joins the workers, so their exit codes are known below
                    except BaseException:  # SIGTERM (Terminated), Ctrl-C: leaving would wait for their FLAIRs
                        _stop_workers(pool, procs)
                        raise
            finally:  # after the workers have ended: the records they sent are all handled
                _stop_forwarder(log_queue, forwarder)
            unsubmitted = remaining[submitted:]
            if not pending and not unsubmitted:
                return
            codes = {pid: p.exitcode for pid, p in dict(procs or {}).items()}
            # the pool stops the other workers with SIGTERM once one has died
            dead = ", ".join(_exit_status(c) for c in sorted({c for c in codes.values()
                                                                if c not in (None, 0, -signal.SIGTERM)}))
            finished, died, retry = _sort_out_broken_pool(pending, inflight, codes, breaks)
            for outcome in finished:
                _record(*outcome, done, failed, opts.output_dir, run_uuid)
            remaining = retry + unsubmitted
            if remaining and len(done) + len(failed) + len(died) + sum(breaks.values()) == progress_before:
                # nothing finished and no FLAIR was running when the pool broke (e.g. a worker died
                # importing TensorFlow): a fresh pool would break the same way, again and again
                how = f"before this FLAIR started ({dead or 'exit status unknown'})"
                died += [(output_prefix(fi.entities), fi, how) for fi, _ in remaining]
                remaining = []
            for prefix, fi, how in died:
                # the out-of-memory killer sends SIGKILL (a shell shows exit code 137)
                oom = "SIGKILL" in how or "exit code 137" in how
                err = (f"worker process died {how}; " + ("likely out of memory: ask for more memory per task "
                       f"or use fewer --nprocs (this run: {nprocs})" if oom else
                       "see the crash log; if it recurs, run this FLAIR alone (--participant-label)"))
                _report_failure(prefix, err, _died_log(fi, how), failed, opts.output_dir, run_uuid)
            if remaining:
                LOGGER.log(IMPORTANT, "a worker process died (%s): processing the %d unfinished FLAIR(s) in a "
                           "fresh pool of worker processes", dead or "exit status unknown", len(remaining))
    finally:
        shutil.rmtree(inflight, ignore_errors=True)


def _sort_out_broken_pool(pending: dict, inflight: Path, exit_codes: dict, breaks: dict) -> tuple[list, list, list]:
    """Sort the FLAIRs of a broken process pool into finished, died with their worker, and to retry.

    Parameters
    ----------
    pending : dict
        Future -> (FlairInput, sha256) of every FLAIR whose outcome was not yet recorded.
    inflight : Path
        Folder of the ``<prefix>.pid`` markers :func:`_process_one` leaves while it runs.
        The markers read are removed.
    exit_codes : dict
        Worker pid -> exit code (``multiprocessing.Process.exitcode``; negative: the signal);
        may be empty when unknown.
    breaks : dict
        prefix -> times the FLAIR was running when a pool broke without it being blamed;
        updated here.

    Returns
    -------
    finished : list of tuple
        :func:`_process_one` outcomes that arrived before the break.
    died : list of (prefix, FlairInput, str)
        FLAIRs to report failed, with how their worker ended (``"(exit code 137)"``...).
    retry : list of (FlairInput, sha256)
        FLAIRs to process in a fresh pool.
    """
    from ..derivatives import output_prefix

    finished, died, retry = [], [], []
    for fut, (fi, sha) in pending.items():
        if fut.done() and fut.exception() is None:
            finished.append(fut.result())
            continue
        prefix = output_prefix(fi.entities)
        marker = Path(inflight) / f"{prefix}.pid"
        try:
            pid_text = marker.read_text().strip()
        except OSError:  # never started, or finished with its result lost in the break: the
            retry.append((fi, sha))  # fresh pool skips it then (outputs complete)
            continue
        marker.unlink(missing_ok=True)
        code = exit_codes.get(int(pid_text)) if pid_text.isdigit() else None
        if code is not None and code != -signal.SIGTERM:  # its own worker died: the pool stopped the others
            died.append((prefix, fi, f"while processing this FLAIR ({_exit_status(code)})"))
            continue
        # stopped by the pool because another worker died, or its worker's end is unknown: it
        # is retried once; running at a second break, it is reported failed, never dropped
        breaks[prefix] = breaks.get(prefix, 0) + 1
        if breaks[prefix] >= 2:
            died.append((prefix, fi, "twice beside this FLAIR's worker, which the pool stopped each time"))
        else:
            retry.append((fi, sha))
    return finished, died, retry


def _exit_status(code: int | None) -> str:
    """``exit code 137``, ``killed by signal SIGKILL``, or ``exit status unknown``."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _died_log(fi, how: str) -> str:
    """The crash-log text of a FLAIR whose worker process died (there is no Python traceback)."""
    return (f"BrokenProcessPool: the worker process died {how}.\nFLAIR: {fi.path}\n"
            "No Python traceback exists: the process was ended from outside (the kernel's out-of-memory "
            "killer sends SIGKILL; a shell reports it as exit code 137) or by a crash in native code. "
            "Check the job's peak memory (Slurm: sacct -j <job> -o JobID,MaxRSS,ReqMem) or the kernel "
            "log (dmesg | grep -i oom), then give each task more memory or use fewer --nprocs.\n")


_WORKER: dict = {}


def _warm_up(opts, threads: int, nprocs: int) -> tuple[str, dict]:
    """Set the device and threads and, for a serial run, import TensorFlow and Keras (worker
    processes import them themselves: :func:`_init_worker`).

    Returns the device used and the seconds it took (``tensorflow_import``, in parallel with
    the BIDS validator).
    """
    t0 = time.perf_counter()
    device = select_device(opts.device, threads, query=nprocs == 1)
    if nprocs == 1:
        import_tensorflow()
    return device, {"tensorflow_import": time.perf_counter() - t0}


def _init_worker(threads: int, device: str, log_queue) -> None:
    """Per worker process: thread budget and device before TensorFlow is imported; its log
    records go to the main process (``log_queue``, :func:`_run_pool`), which writes them to
    the console and the run's log as its own; it ends when the main process does.

    A worker's own standard error is the main process's file descriptor 2, which points at
    ``logs/native_<run>.log`` (TensorFlow's C++ messages): records written there would reach
    neither the console nor the run's log.
    """
    import logging.handlers
    import multiprocessing as mp

    root = logging.getLogger("ms3seg")
    root.handlers.clear()
    root.setLevel(logging.DEBUG)  # the main process's handlers filter by their own levels
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    parent = mp.parent_process()
    if parent is not None:
        # killed with SIGKILL, the main process cannot stop its workers: each would finish its
        # FLAIR and then wait, holding its memory, as an orphan
        threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
    select_device("cpu" if device == "cpu" else device, threads)
    import_tensorflow()


def _exit_with(parent) -> None:
    """Wait for the ``multiprocessing`` parent process to end, then end this process at once."""
    parent.join()
    os._exit(EX_TERMINATED)


def _log_forwarder(ctx) -> tuple:
    """A queue for the workers' log records (:func:`_init_worker`) and a daemon thread that hands
    each to this process's ``ms3seg`` handlers, each at its own level.

    Hand-written instead of :class:`logging.handlers.QueueListener`, whose ``stop()`` waits
    without a time limit: a worker killed while writing to the queue can leave its lock held,
    and the run would never end (:func:`_stop_forwarder` waits 5 s at most).
    """
    q = ctx.Queue()
    handlers = list(logging.getLogger("ms3seg").handlers)

    def forward():
        while True:
            try:
                record = q.get()
            except (EOFError, OSError, ValueError):  # the queue was closed or broken
                return
            if record is None:
                return
            for h in handlers:
                if record.levelno >= h.level:
                    h.handle(record)

    t = threading.Thread(target=forward, daemon=True, name="ms3seg-worker-logs")
    t.start()
    return q, t


def _stop_forwarder(q, t) -> None:
    """End :func:`_log_forwarder`'s thread once it has handled what the workers sent (5 s at most)."""
    q.put(None)
    t.join(5)
    q.cancel_join_thread()  # this process's exit never waits for a queue a dead worker left locked
    q.close()


def _stop_workers(pool, procs: dict | None) -> None:
    """Stop a process pool's workers now (SIGTERM; SIGKILL after 10 s), not after their FLAIRs.

    :meth:`concurrent.futures.Executor.shutdown` only waits for running tasks. ``procs``: the
    pool's own pid -> process (read where the pool was made); without it, this process's
    :func:`multiprocessing.active_children`.
    """
    import multiprocessing as mp

    pool.shutdown(wait=False, cancel_futures=True)
    children = list(dict(procs).values()) if procs else mp.active_children()
    for p in children:
        p.terminate()
    for p in children:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def _predictor(job: dict, background: bool = False):
    """The model, loaded once per process (``background``: its networks load in a thread,
    :meth:`~ms3seg_app.model.predict.Predictor.load`); the in-plane crop (``--crop``) is only a
    setting of the loaded model, so another crop does not load it again."""
    o = job["options"]
    key = (str(job["model"]), job["allow_unverified"], o.tta, o.members)
    if key not in _WORKER:
        from ..model.predict import Predictor

        _WORKER.clear()
        _WORKER[key] = Predictor.load(job["model"], job["allow_unverified"], tta=o.tta, members=o.members,
                                      crop=o.crop, background=background)
    _WORKER[key].crop = o.crop
    return _WORKER[key]


def _process_one(fi, job: dict, source_sha: str | None = None):
    """Process one FLAIR; never raises: returns (prefix, result or None, error line or None, traceback)."""
    from ..derivatives import output_prefix

    prefix = output_prefix(fi.entities)
    marker = Path(job["inflight_dir"]) / f"{prefix}.pid" if job.get("inflight_dir") else None
    try:
        if marker is not None:  # left behind if this process dies: see _run_pool
            marker.write_text(str(os.getpid()))
        from ..participant import process_flair

        res = process_flair(fi, _predictor(job), job["output_dir"], job["options"], job["work_dir"], job["bids_dir"],
                            source_sha)
        return prefix, res, None, None
    except Exception as exc:  # one FLAIR's failure never loses the others
        return prefix, None, _error_line(exc), traceback.format_exc()
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def _error_line(exc: BaseException) -> str:
    """One line: the message for bad input, what to do for a full disk, a read-only folder or
    too little memory, or stage + type for a bug."""
    from ..exceptions import SYSTEM_ERRORS, MS3SegError, is_system_error

    stage = getattr(exc, "ms3seg_stage", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MS3SegError):
        return first
    where = f" in stage '{stage}'" if stage else ""
    if isinstance(exc, OSError) and exc.errno in SYSTEM_ERRORS:
        name = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or first}{name}{where}: {SYSTEM_ERRORS[exc.errno]}"
    if is_system_error(exc):  # the others: too little memory (TensorFlow's, a GPU's, included)
        return f"out of memory{where}: ask for more memory per task (or GPU), or use fewer --nprocs"
    return f"internal error{where} ({type(exc).__name__}: {first}); this is a bug: please report it with the crash log"


def _record(prefix, res, err, tb, done, failed, output_dir: Path, run_uuid: str) -> None:
    if err is None:
        done.append(prefix)
        if res.status == "skipped":
            LOGGER.log(IMPORTANT, "%s: skipped (outputs complete)", prefix)
            return
        v = res.volumes
        LOGGER.log(IMPORTANT, "%s: %d lesion(s), abnormal WMH %.2f mL, normal WMH %.2f mL, ventricles %.1f mL"
                   "%s (%.1f s)", prefix, v.get("lesion_count", 0), v.get("abnormal_wmh_ml", float("nan")),
                   v.get("normal_wmh_ml", float("nan")), v.get("ventricles_ml", float("nan")),
                   f", {len(res.warnings)} QC warning(s)" if res.warnings else "", res.seconds)
        LOGGER.debug("%s: STAGE_SECONDS %s", prefix, json.dumps({k: round(s, 3) for k, s in res.timings.items()}))
        return
    _report_failure(prefix, err, tb, failed, output_dir, run_uuid)


def _report_failure(prefix, err, tb, failed, output_dir: Path, run_uuid: str) -> None:
    from ..derivatives import atomic_write_text, crash_log_path

    crash = crash_log_path(output_dir, prefix, run_uuid)
    atomic_write_text(crash, (tb or "") + f"\n{err}\n")
    failed.append((prefix, err))
    LOGGER.error("%s: FAILED: %s (details: %s)", prefix, err, crash)


if __name__ == "__main__":
    sys.exit(command())
