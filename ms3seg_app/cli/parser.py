"""BIDS-App command line (after fMRIPrep's ``cli/parser.py``).

Everything a user can get wrong on the command line is checked in :func:`parse_args`,
before anything is written and before TensorFlow or the model are loaded: usage errors
exit with status 2 and a one-line message naming the argument and the fix.

This module imports only the standard library at import time, so ``--version``,
``--help`` and usage errors answer at once.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import __version__

EPILOG = """\
examples:
  ms3seg /data/bids /data/derivatives/ms3seg participant --participant-label 01 02
  ms3seg /data/bids /data/derivatives/ms3seg group

documentation: README.md of the ms3seg-app source tree (outputs, exit codes, QC,
containers, clusters); `ms3seg --info` describes this installation for bug reports.
"""


class _InfoAction(argparse.Action):
    """``--info``: version, Python, platform, model, FSL and GPU, then exit 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(info_report())
        parser.exit()


def info_report() -> str:
    """Describe this installation for bug reports (``ms3seg --info``).

    No model is loaded and :mod:`ms3seg_app.stages` is not imported; TensorFlow is
    imported (quietly) only to list GPUs, and only if it is installed and
    ``CUDA_VISIBLE_DEVICES`` is not empty.

    Returns
    -------
    str
        Lines ``ms3seg-app <version>``, ``Python: ...``, ``platform: ...``, ``model: ...``
        (possibly several lines), ``FSL: ...`` and ``GPU: ...``.
    """
    import importlib.util
    import platform
    import shutil
    import sys

    lines = [f"ms3seg-app {__version__}", f"Python: {sys.version.split()[0]} ({sys.executable})",
             f"platform: {platform.platform()}"]
    try:
        from ..model.card import describe_installed_model

        desc = describe_installed_model().strip()
        lines.append(desc if desc.startswith("model:") else f"model: {desc}")
    except Exception as exc:  # report, never crash --info
        lines.append(f"model: unavailable ({type(exc).__name__}: {exc})")
    # The same test as ms3seg_app.stages.fsl_available(), repeated here because importing
    # stages pulls in nibabel, nipype and scipy, which --info must not wait for.
    bet, fsldir = shutil.which("bet"), os.environ.get("FSLDIR")
    if bet and shutil.which("flirt") and fsldir:
        lines.append(f"FSL: found ({bet}, FSLDIR={fsldir})")
    else:
        missing = [n for n, ok in (("bet", bet), ("flirt", shutil.which("flirt")), ("FSLDIR", fsldir)) if not ok]
        lines.append(f"FSL: not found (no {', '.join(missing)}; deepbet and ANTsPy are used)")
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        gpu = "not checked (CUDA_VISIBLE_DEVICES is empty)"
    elif importlib.util.find_spec("tensorflow") is None:
        gpu = "not checked (TensorFlow is not installed)"
    else:
        try:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # no CUDA chatter; the process exits right after
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            gpu = (f"{len(gpus)} found ({', '.join(g.name for g in gpus)})" if gpus
                   else "none found (TensorFlow runs on the CPU)")
        except Exception as exc:  # pragma: no cover - a broken TensorFlow install
            gpu = f"TensorFlow not importable ({type(exc).__name__}: {exc})"
    lines.append(f"GPU: {gpu}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    # Defaults are written into the help texts by hand (with %(default)s where useful):
    # ArgumentDefaultsHelpFormatter would append "(default: None)" / "(default: False)"
    # to every flag. RawDescriptionHelpFormatter keeps the epilog's example lines.
    p = argparse.ArgumentParser(
        prog="ms3seg",
        description="MS3SEG tri-mask segmentation (ventricles, normal WMH, abnormal WMH) of BIDS FLAIR data.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="BIDS-Derivatives output folder (created if missing)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="'participant': segment each FLAIR; 'group': tables, statistics and QC over all results")
    p.add_argument("--version", action="version", version=f"ms3seg-app {__version__}",
                   help="print 'ms3seg-app <version>' and exit")
    p.add_argument("--info", action=_InfoAction,
                   help="print version, Python, platform, model, FSL and GPU status (for bug reports) and exit")

    g = p.add_argument_group("inputs and selection")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=None, metavar="LABEL",
                   help="participant level: participant labels, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", "--session_label", nargs="+", default=None, metavar="LABEL",
                   help="participant level: session labels, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", type=Path, default=None, metavar="FILE",
                   help='participant level: JSON of pybids filters per query: {"flair": {...}, "t1w": {...}, "t2w": {...}}')
    g.add_argument("--skip-bids-validation", action="store_true",
                   help="do not run the BIDS validator on the input dataset")

    g = p.add_argument_group("processing options")
    g.add_argument("--skull-strip", choices=["auto", "fsl", "deepbet", "none"], default="auto",
                   help="brain extraction: 'none' for skull-stripped input (its voxels above 0 are the "
                        "brain); 'auto' is 'none' for input found skull-stripped (zero background and "
                        "deepbet's check), else FSL BET if installed, else deepbet (default: %(default)s)")
    g.add_argument("--n4", action="store_true", help="N4 bias-field correction (ANTsPy) before segmentation")
    g.add_argument("--no-tta", action="store_true", help="no left-right flip test-time augmentation")
    g.add_argument("--crop", choices=["head", "brain"], default="head",
                   help="in-plane crop of each slice the network sees: the whole head, or the brain's "
                        "bounding box plus a margin (about a third less network time on clinical scans, less "
                        "context; "
                        "its accuracy is in the README) (default: %(default)s)")
    g.add_argument("-w", "--work-dir", type=Path, default=None, metavar="DIR",
                   help="folder for intermediate files, kept after the run "
                        "(default: a temporary folder, deleted at the end)")

    g = p.add_argument_group("performance")
    g.add_argument("--nprocs", type=int, default=1, metavar="N",
                   help="FLAIRs processed in parallel (default: %(default)s)")
    g.add_argument("--omp-nthreads", type=int, default=0, metavar="N",
                   help="threads per FLAIR (default: 0, the CPUs this process may use - its affinity "
                        "and cgroup quota, e.g. a SLURM task's - divided by --nprocs)")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where TensorFlow runs; 'auto' uses a GPU if one is found (default: %(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, default=None, metavar="FILE",
                   help="another .keras/.h5 model with its *_model_card.json beside it (default: bundled weights)")
    g.add_argument("--members", type=int, nargs="+", default=None, metavar="I",
                   help="run only these members of the model's ensemble, numbered from 0 as listed in its card "
                        "(default: all; nnU-Net's -f): each member is a whole network, so one of three takes a "
                        "third of the network time, without the ensemble's averaging and, alone, without the "
                        "per-lesion uncertainty")
    g.add_argument("--allow-unverified-model", action="store_true",
                   help="load a model whose sha256 differs from its card or that contains custom code")

    g = p.add_argument_group("output and verbosity")
    g.add_argument("--no-reports", action="store_true",
                   help="skip the HTML reports (participant level: one per FLAIR; group level: group.html)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv for debug)")
    g.add_argument("-q", "--quiet", action="count", default=0, help="fewer messages")
    return p


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``/`` at worst)."""
    for p in (path, *path.parents):
        try:
            if p.exists():
                return p
        except OSError:  # e.g. permission denied on a parent: keep walking up
            continue
    return Path(path.anchor or "/")


def _check_writable_dir(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be used as a folder to write into, or ``None`` if it can.

    Nothing is created: the nearest existing ancestor must be a folder this user can
    write into (``os.access``), and no part of the path may be a regular file.
    """
    base = _nearest_existing(path)
    if base == path and not path.is_dir():
        return f"{what} {path} exists and is not a folder; give a folder path (it is created if missing)"
    if not base.is_dir():
        return (f"{what} {path} is below {base}, which is a file, not a folder; "
                "choose a path whose parents are folders")
    if not os.access(base, os.W_OK | os.X_OK):
        verb = "is" if base == path else f"would be created in {base}, which is"
        return f"{what} {path} {verb} not writable by this user; choose a writable folder or fix its permissions"
    return None


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit 2 with ``ms3seg: error: <message>`` on one line.

    ``parser.error`` would print the whole usage block first, which says nothing about a
    wrong path or value; argparse still prints it for syntax errors (unknown option...).
    """
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and cross-check the command line.

    Checks, before anything is written: participant/session labels, given at the participant
    level only; ``bids_dir`` is a readable folder holding ``dataset_description.json``;
    ``output_dir`` and ``-w`` are (or can be created as) writable folders, with no file in
    their path, neither inside ``bids_dir``; ``--bids-filter-file`` (read and validated, see
    :func:`ms3seg_app.bids.load_filters`) and ``--model`` are existing files; ``--nprocs``
    is at least 1; ``--members`` are indices of the model card's members (sorted, once each).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        The options, with ``bids_dir``, ``output_dir`` and ``work_dir`` made absolute and
        labels stripped of ``sub-``/``ses-``.

    Raises
    ------
    SystemExit
        Code 2 with a one-line message on stderr for any usage error; code 0 after
        ``--help``, ``--version`` or ``--info``.
    """
    from ..bids import load_filters, validate_label
    from ..exceptions import UsageError

    parser = _build_parser()
    opts = parser.parse_args(argv)
    try:
        if opts.participant_label:
            opts.participant_label = sorted({validate_label(x, "participant") for x in opts.participant_label})
        if opts.session_label:
            opts.session_label = sorted({validate_label(x, "session") for x in opts.session_label})
    except UsageError as exc:
        _fail(parser, str(exc))
    if opts.nprocs < 1:
        _fail(parser, f"--nprocs must be >= 1 (got {opts.nprocs})")
    given = [f for f, v in (("--participant-label", opts.participant_label), ("--session-label", opts.session_label),
                            ("--bids-filter-file", opts.bids_filter_file)) if v]
    if opts.analysis_level == "group" and given:
        # the group level tabulates and compares every result in output_dir; a subset would
        # silently replace the dataset's group tables with a partial one
        what = "is a participant-level option" if len(given) == 1 else "are participant-level options"
        _fail(parser, f"{' and '.join(given)} {what}; the group level always reads every result in "
              f"output_dir: leave {'it' if len(given) == 1 else 'them'} out of the group command")

    bids = opts.bids_dir.resolve()
    out = opts.output_dir.resolve()
    if not bids.exists():
        _fail(parser, f"bids_dir {opts.bids_dir} does not exist; give the root folder of a BIDS dataset")
    if not bids.is_dir():
        _fail(parser, f"bids_dir {opts.bids_dir} is a file, not a folder; give the root folder of a BIDS dataset")
    if not os.access(bids, os.R_OK | os.X_OK):
        _fail(parser, f"bids_dir {bids} is not readable by this user; fix its permissions")
    if not (bids / "dataset_description.json").is_file():
        _fail(parser, f"bids_dir {bids} has no dataset_description.json, so it is not the root of a BIDS "
              "dataset; give the folder that holds dataset_description.json and the sub-* folders")

    if out == bids or bids in out.parents:
        _fail(parser, f"output_dir {out} is inside bids_dir {bids}: the input dataset is never written to; "
              "choose an output folder outside it")
    if out in bids.parents:
        _fail(parser, f"bids_dir {bids} is inside output_dir {out}; choose separate folders")
    problem = _check_writable_dir(out, "output_dir")
    if problem:
        _fail(parser, problem)

    if opts.work_dir is not None:
        w = opts.work_dir.resolve()
        if w == bids or bids in w.parents:
            _fail(parser, f"-w/--work-dir {w} is inside bids_dir {bids}: the input dataset is never written to; "
                  "choose a work folder outside it")
        problem = _check_writable_dir(w, "-w/--work-dir")
        if problem:
            _fail(parser, problem)
        opts.work_dir = w

    for flag, path in (("--bids-filter-file", opts.bids_filter_file), ("--model", opts.model)):
        if path is None:
            continue
        if not path.exists():
            _fail(parser, f"{flag} {path} does not exist; check the path")
        if not path.is_file():
            _fail(parser, f"{flag} {path} is not a file; give the path of the file itself")
    if opts.members is not None:
        from ..exceptions import ModelError
        from ..model.card import load_card

        try:
            card = load_card(opts.model)
        except ModelError:
            card = None  # a broken card is reported by the run, with its own message
        if card is not None:
            try:
                opts.members = list(card.member_indices(opts.members))
            except ModelError as exc:
                _fail(parser, f"--members: {exc}")
    try:
        opts.bids_filters = load_filters(opts.bids_filter_file)  # read again by the run; checked here
    except UsageError as exc:
        _fail(parser, f"--bids-filter-file: {exc}")

    opts.bids_dir, opts.output_dir = bids, out
    return opts
