"""BIDS-App command line (after fMRIPrep's ``cli/parser.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__


class _VersionAction(argparse.Action):
    """``--version``: package version, model sha256, and whether FSL and a GPU are found."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_report())
        parser.exit()


def version_report() -> str:
    """Lines describing this installation (no model is loaded; the card is read)."""
    import os
    import shutil

    lines = [f"ms3seg-app {__version__}"]
    try:
        from ..model.card import read_card, resolve_weights

        w = resolve_weights(None)
        card = read_card(w)
        lines.append(f"model: {card.get('name')} ({w.name}) sha256 {card['sha256']}")
    except Exception as exc:  # report, never crash --version
        lines.append(f"model: not found ({exc})")
    from ..stages import fsl_available

    lines.append("FSL: " + (f"found ({shutil.which('bet')})" if fsl_available() else "not found (deepbet and ANTsPy are used)"))
    gpu = "not checked (CUDA_VISIBLE_DEVICES is empty)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else None
    if gpu is None:
        try:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            gpu = f"{len(gpus)} found" if gpus else "none found (TensorFlow runs on the CPU)"
        except Exception as exc:  # pragma: no cover
            gpu = f"TensorFlow not importable ({exc})"
    lines.append(f"GPU: {gpu}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ms3seg",
        description="MS3SEG tri-mask segmentation (ventricles, normal WMH, abnormal WMH) of BIDS FLAIR data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="BIDS-Derivatives output folder")
    p.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    p.add_argument("--version", action=_VersionAction, help="show version, model sha256, FSL and GPU status")
    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=None,
                   help="participant labels, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", "--session_label", nargs="+", default=None,
                   help="session labels, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", type=Path, default=None,
                   help='JSON of pybids filters per query: {"flair": {...}, "t1w": {...}, "t2w": {...}}')
    g.add_argument("--skip-bids-validation", action="store_true",
                   help="do not run the BIDS validator on the input dataset")
    g = p.add_argument_group("processing")
    g.add_argument("-w", "--work-dir", type=Path, default=None, help="folder for intermediate files")
    g.add_argument("--nprocs", type=int, default=1, help="parallel FLAIRs")
    g.add_argument("--omp-nthreads", type=int, default=0, help="threads per FLAIR (0: all cores / nprocs)")
    g.add_argument("--skull-strip", choices=["auto", "fsl", "deepbet", "none"], default="auto",
                   help="brain extraction: FSL BET if installed else deepbet; 'none' for skull-stripped input")
    g.add_argument("--n4", action="store_true", help="N4 bias-field correction (ANTsPy) before segmentation")
    g.add_argument("--model", type=Path, default=None,
                   help="another .keras/.h5 model with its *_model_card.json (default: bundled weights)")
    g.add_argument("--allow-unverified-model", action="store_true",
                   help="load a model whose sha256 differs from its card or that contains custom code")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="where TensorFlow runs")
    g.add_argument("--no-tta", action="store_true", help="no left-right flip test-time augmentation")
    g.add_argument("--no-reports", action="store_true", help="skip the HTML reports")
    g = p.add_argument_group("messages")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv for debug)")
    g.add_argument("-q", "--quiet", action="count", default=0, help="fewer messages")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and cross-check arguments; usage errors exit with status 2."""
    from ..bids import validate_label
    from ..exceptions import UsageError

    parser = _build_parser()
    opts = parser.parse_args(argv)
    try:
        if opts.participant_label:
            opts.participant_label = sorted({validate_label(x, "participant") for x in opts.participant_label})
        if opts.session_label:
            opts.session_label = sorted({validate_label(x, "session") for x in opts.session_label})
    except UsageError as exc:
        parser.error(str(exc))
    bids = opts.bids_dir.resolve()
    out = opts.output_dir.resolve()
    if not bids.is_dir():
        parser.error(f"bids_dir {opts.bids_dir} does not exist")
    if out == bids or bids in out.parents:
        parser.error(f"output_dir {out} is inside bids_dir {bids}: the input dataset is never written to; "
                     "choose an output folder outside it")
    if out in bids.parents:
        parser.error(f"bids_dir {bids} is inside output_dir {out}; choose separate folders")
    if opts.work_dir is not None:
        w = opts.work_dir.resolve()
        if w == bids or bids in w.parents:
            parser.error(f"work dir {w} is inside bids_dir {bids}")
    if opts.nprocs < 1:
        parser.error("--nprocs must be >= 1")
    opts.bids_dir, opts.output_dir = bids, out
    return opts
