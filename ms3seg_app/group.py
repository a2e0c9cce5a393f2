"""Group level: one burden table for the dataset, QC flags, statistics, longitudinal change.

Reads only what participant runs wrote in ``output_dir`` (tables and sidecars; images
only for the longitudinal registration), so it works after cluster jobs of which some
failed, and scales to thousands of participants.

Outputs (listed in ``.bidsignore``):

- ``group_desc-trimask_volumes.tsv``: one row per FLAIR, every volume and share,
  lesion counts by location, QC flags, ``participants.tsv`` covariates joined in.
- ``group_desc-trimask_stats.tsv``: the statistical tests (see :func:`statistics`).
- ``group_desc-trimask_agebands.tsv``: burden by age band.
- ``group_desc-trimask_longitudinal.tsv``: change between consecutive sessions, in the
  order of :func:`order_sessions` (``sessions.tsv`` acquisition times, else labels).
- ``group_desc-trimask_qc.tsv``: failed/missing participants and flagged FLAIRs.
- ``group.html``: the report.

A FLAIR whose results are incomplete (its dseg sidecar, written last by the participant
level, is missing, or a file that sidecar lists in ``Outputs`` is missing) is flagged
``incomplete`` in the QC table and kept out of the statistics, the longitudinal change and
the vote on model, members and inference options; its row stays in the volumes table.
Where a participant process holds the FLAIR's lock (a group run while array tasks are still
running) it is reported as ``being processed`` instead. A FLAIR that a participant-level run
selected (``logs/config-*.json``) and that has no result at all (its task was killed before
writing anything) is listed in the QC table too.
"""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .bids import label_sort_key
from .derivatives import atomic_write_text
from .exceptions import InputDataError

LOGGER = logging.getLogger("ms3seg.group")
from .derivatives import GROUP_OUTPUTS, prefix_from_crash_log  # noqa: E402  (the one place outputs are named)

GROUP_TABLE = GROUP_OUTPUTS["volumes"]
STATS_TABLE = GROUP_OUTPUTS["stats"]
AGEBAND_TABLE = GROUP_OUTPUTS["agebands"]
LONG_TABLE = GROUP_OUTPUTS["longitudinal"]
QC_TABLE = GROUP_OUTPUTS["qc"]
KEYS = ["participant_id", "session_id", "acq", "run"]
BURDEN = ["abnormal_wmh_ml", "normal_wmh_ml", "ventricles_ml",
          "abnormal_wmh_icv_fraction", "normal_wmh_icv_fraction", "ventricles_icv_fraction"]
AGE_BANDS = [(18, 29), (30, 39), (40, 49), (50, 59), (60, 200)]
#: robust z-score (median/MAD) above which a FLAIR is flagged as an outlier
OUTLIER_Z = 3.5


def _tsv(df: pd.DataFrame) -> str:
    return df.to_csv(sep="\t", index=False, float_format="%.6g", na_rep="n/a")


def _read_tsv(path: Path, unread: str, **kwargs) -> pd.DataFrame | None:
    """A BIDS TSV file of the dataset, or None (with a warning that ends with ``unread``) if it
    cannot be read. BIDS asks for UTF-8; a file that is not (Latin-1 / Windows-1252, as
    spreadsheet programs save) is read as Windows-1252 with a warning: its values (optional
    covariates, session times) are more useful than a refusal."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        LOGGER.warning("%s not read (%s): %s", path, exc, unread)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        LOGGER.warning("%s is not UTF-8 text as BIDS requires: read as Latin-1/Windows-1252; check its "
                       "accented values and save it as UTF-8", path)
    try:
        return pd.read_csv(io.StringIO(text), sep="\t", keep_default_na=False, na_values=["n/a", ""], **kwargs)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        LOGGER.warning("%s not read (%s): %s", path, " ".join(str(exc).split()) or type(exc).__name__, unread)
        return None


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """The dataset's ``participants.tsv``: one row per participant, for the covariates and the
    list of participants expected to have results.

    A participant listed twice keeps the first row (with a warning); a file that cannot be
    read or has no ``participant_id`` column is ignored with a warning (:func:`_read_tsv` for
    the text encoding).

    Parameters
    ----------
    bids_dir : Path
        The BIDS dataset.

    Returns
    -------
    DataFrame
        ``participant_id`` (str, e.g. ``sub-01``) and the file's other columns (numbers where
        a column holds only numbers, ``n/a`` as missing); no rows (and only ``participant_id``)
        where the file is absent or ignored.
    """
    path = Path(bids_dir) / "participants.tsv"
    unread = "no covariates are joined and no participant is listed as missing"
    table = _read_tsv(path, unread, dtype={"participant_id": str}) if path.is_file() else None
    if table is not None and "participant_id" not in table:
        LOGGER.warning("%s has no participant_id column (columns: %s): %s", path,
                       ", ".join(map(str, table.columns[:10])), unread)
        table = None
    if table is None:
        return pd.DataFrame(columns=["participant_id"])
    table = table.dropna(subset=["participant_id"]).assign(participant_id=lambda t: t["participant_id"].str.strip())
    repeated = table["participant_id"][table["participant_id"].duplicated()].unique().tolist()
    if repeated:
        LOGGER.warning("%s lists %d participant(s) more than once (%s%s): the first row of each is used",
                       path, len(repeated), ", ".join(repeated[:10]), " ..." if len(repeated) > 10 else "")
    return table.drop_duplicates("participant_id").reset_index(drop=True)


def _acq_times(bids_dir: Path, participant_id: str, sessions: list[str]) -> tuple[list | None, bool]:
    """The ``acq_time`` of each of a participant's ``sessions`` from
    ``sub-<label>/sub-<label>_sessions.tsv`` (found by path: the group level builds no pybids
    layout); ``(None, has_acq_time)`` unless every session has its own parseable time."""
    path = Path(bids_dir) / participant_id / f"{participant_id}_sessions.tsv"
    table = _read_tsv(path, f"sessions of {participant_id} ordered by their labels", dtype=str) \
        if path.is_file() else None
    if table is None or not {"session_id", "acq_time"} <= set(table.columns):
        return None, False
    ids = table["session_id"].fillna("").str.strip()
    ids = ids.where(ids.str.startswith("ses-"), "ses-" + ids)
    # ISO 8601 as BIDS writes it (optional fractional seconds and zone); times without a zone as UTC
    times = pd.to_datetime(table["acq_time"].str.strip(), format="ISO8601", utc=True, errors="coerce")
    found = dict(zip(ids[::-1], times[::-1]))  # the first row of a session listed twice
    out = [found.get(s, pd.NaT) for s in sessions]
    return (None if any(pd.isna(t) for t in out) or len(set(out)) < len(out) else out), True


def _label_or_number(values: pd.Series) -> pd.Series:
    return values if pd.api.types.is_numeric_dtype(values) else label_sort_key(values)


def order_sessions(df: pd.DataFrame, bids_dir: Path | None = None) -> pd.DataFrame:
    """The FLAIR rows in session order: the one order of the group level (tables, baseline,
    longitudinal change).

    Participants in the order of their labels' numbers; each participant's sessions by
    ``acq_time`` of ``sub-<label>/sub-<label>_sessions.tsv`` in ``bids_dir`` where it gives
    every session of the participant a distinct, parseable ISO 8601 time, else by their
    labels' numbers (``ses-2`` before ``ses-10``; rows without a session first); then
    ``acq`` and ``run``. A participant whose sessions are ordered by labels without numbers
    (``pre``/``post``), or whose ``acq_time`` values cannot be used, is named in a warning.
    Rows that already carry ``session_rank`` (this function's output) are only sorted again.

    Parameters
    ----------
    df : DataFrame
        One row per FLAIR with ``participant_id`` and ``session_id`` (``n/a`` without
        sessions); ``acq`` and ``run`` where present.
    bids_dir : Path or None
        The BIDS dataset; ``None``: sessions by their labels, without warnings.

    Returns
    -------
    DataFrame
        The rows sorted, with ``session_rank`` (int, 0 for the participant's first session;
        -1 without a session) and ``session_order`` (``"acq_time"`` or ``"label"``) added.
    """
    if "session_rank" not in df:
        df = df if "session_id" in df else df.assign(session_id="n/a")
        rank, how, unclear = {}, {}, []
        pairs = df.loc[df["session_id"] != "n/a", ["participant_id", "session_id"]].drop_duplicates()
        for sub, labels in pairs.sort_values(["participant_id", "session_id"], key=label_sort_key) \
                .groupby("participant_id", sort=False)["session_id"]:
            labels = labels.tolist()
            times, has_acq_time = _acq_times(bids_dir, sub, labels) if bids_dir is not None and len(labels) > 1 \
                else (None, False)
            if times is not None:
                labels = [s for _, s in sorted(zip(times, labels))]
            elif bids_dir is not None and len(labels) > 1 and (
                    has_acq_time or not all(re.search(r"\d", s.removeprefix("ses-")) for s in labels)):
                unclear.append(sub)
            how[sub] = "acq_time" if times is not None else "label"
            rank.update({(sub, s): i for i, s in enumerate(labels)})
        if unclear:
            LOGGER.warning("the sessions of %s are ordered by their labels, which need not be the order of "
                           "acquisition (the baseline and the longitudinal change follow it): give each of their "
                           "sessions a distinct acq_time in sub-<label>/sub-<label>_sessions.tsv",
                           ", ".join(unclear[:10]) + (f" and {len(unclear) - 10} more" if len(unclear) > 10 else ""))
        df = df.assign(session_rank=[rank.get(k, -1) for k in zip(df["participant_id"], df["session_id"])],
                       session_order=[how.get(p, "label") for p in df["participant_id"]])
    keys = ["participant_id", "session_rank"] + [c for c in ("acq", "run") if c in df]
    return df.sort_values(keys, key=_label_or_number, kind="stable").reset_index(drop=True)


def missing_outputs(output_dir: Path, sidecar: Path, meta: dict | None) -> list[str] | None:
    """Files of one FLAIR's results that are missing, as paths relative to ``output_dir``.

    Parameters
    ----------
    output_dir : Path
        The participant level's output folder.
    sidecar : Path
        The FLAIR's ``*_space-orig_desc-trimask_dseg.json``: written last by the
        participant level, it marks the FLAIR as complete, and its ``Outputs`` key lists
        every file written for the FLAIR, relative to ``output_dir``.
    meta : dict or None
        The sidecar's content; ``None`` if it is missing or unreadable.

    Returns
    -------
    list of str or None
        The missing files (the sidecar itself if ``meta`` is None; an explanation if
        ``Outputs`` is not a list of paths); empty if all exist; ``None`` if the sidecar has
        no ``Outputs`` (written by an older version), so completeness cannot be checked.
    """
    output_dir = Path(output_dir)
    if meta is None:
        return [_rel(sidecar, output_dir)]
    outputs = meta.get("Outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return [f"{_rel(sidecar, output_dir)} ('Outputs' is not a list of paths)"]
    return [o for o in outputs if not (output_dir / o).exists()]


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _incomplete_message(missing: list[str], participant_id: str) -> str:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    label = str(participant_id).removeprefix("sub-")
    return (f"incomplete (missing {shown}): re-run the participant level for {participant_id} "
            f"(--participant-label {label})")


#: QC problem of a FLAIR whose lock a participant process holds now (:func:`flair_lock_held`)
BEING_PROCESSED = ("being processed (its participant-level run holds the lock): run the group level again "
                   "when it has finished")


def _no_result_message(participant_id: str) -> str:
    label = str(participant_id).removeprefix("sub-")
    return (f"no result: its participant-level run did not finish (killed or still running); re-run the "
            f"participant level for {participant_id} (--participant-label {label})")


def flair_lock_held(output_dir: Path, prefix: str) -> bool:
    """Whether a running participant process holds a FLAIR's lock now
    (:func:`~ms3seg_app.participant.flair_lock`), tested without waiting.

    The lock is tried with the participant level's own primitive (``fcntl.flock``,
    ``LOCK_EX | LOCK_NB``) on its lock file and released at once. A lock file that does not
    exist is not created (the FLAIR was never locked: not held), and none is deleted. The
    kernel drops the lock of a process that dies, so a lock file left by a killed job is not
    held.

    Parameters
    ----------
    output_dir : Path
        The participant level's output folder.
    prefix : str
        The FLAIR's :func:`~ms3seg_app.derivatives.output_prefix`.

    Returns
    -------
    bool
        True if another process holds the lock; False if it is free, if there is no lock file,
        or if the file system cannot tell (no ``flock`` support).
    """
    import errno
    import fcntl
    import os

    from .derivatives import flair_lock_path

    path = flair_lock_path(output_dir, prefix)
    fd = None
    # read-write where allowed: where flock is emulated with POSIX locks (NFS), an exclusive lock
    # needs a descriptor open for writing; O_CREAT is never given, so nothing is created
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            fd = os.open(path, flags)
            break
        except PermissionError:
            continue
        except OSError:  # no lock file (never locked), or not readable
            return False
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        # EWOULDBLOCK: another open file description holds it; other errors (no flock support): cannot tell
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)  # taken only to test it: a participant job waiting for it goes on
    finally:
        os.close(fd)
    return False


def inference_options(meta: dict) -> str:
    """The inference options of a dseg sidecar that are not the defaults, as the command-line
    flags that set them (space-separated; empty for the defaults). A sidecar without
    ``InferenceCrop`` was made with one crop for the whole slice stack (before per-slice crops):
    ``"stack crop"``, so that a group mixing such results with newer ones is flagged.

    Parameters
    ----------
    meta : dict, the FLAIR's ``*_desc-trimask_dseg.json``

    Returns
    -------
    str, e.g. ``"--no-tta --crop brain"``
    """
    flags = []
    if meta.get("TestTimeAugmentation") is False:
        flags.append("--no-tta")
    crop = meta.get("InferenceCrop")
    if not isinstance(crop, str):
        flags.append("stack crop")
    elif crop != "head":
        flags.append(f"--crop {crop}")
    return " ".join(flags)


def collect_volumes(output_dir: Path) -> pd.DataFrame:
    """Concatenate every ``*_desc-trimask_volumes.tsv`` under ``output_dir`` (sorted by labels,
    deterministic; :func:`order_sessions` puts sessions in acquisition order).

    Also reads each FLAIR's dseg sidecar for the source hash and QC warnings, and checks
    that the FLAIR's results are complete (:func:`missing_outputs`).

    Parameters
    ----------
    output_dir : Path
        The participant level's output folder.

    Returns
    -------
    DataFrame
        One row per FLAIR, with ``flair_source`` (the input FLAIR, as the BIDS URI of its dseg
        sidecar's ``Sources``), ``source_sha256``, ``model_sha256``, ``model_members`` (the
        ``--members`` subset, space-separated; empty for the whole ensemble), ``inference_options``
        (:func:`inference_options`), ``qc_messages``,
        ``prefix``, ``report``, ``qc_incomplete`` (bool) and ``qc_incomplete_message`` (empty
        if complete; :data:`BEING_PROCESSED` where a participant process holds the FLAIR's
        lock, :func:`flair_lock_held`, tested only for incomplete FLAIRs) added.

    Raises
    ------
    InputDataError
        If ``output_dir`` holds no participant results.
    """
    from .derivatives import find_outputs, flair_entities, flair_outputs, output_prefix

    files = find_outputs(output_dir, "volumes")
    if not files:
        raise InputDataError(f"{output_dir} holds no participant results (*_desc-trimask_volumes.tsv); "
                             "run the participant level first")
    frames = []
    unchecked = []
    for f in files:
        df = pd.read_csv(f, sep="\t", dtype={k: str for k in KEYS}, keep_default_na=False, na_values=["n/a", ""])
        ents = flair_entities(f)
        named = flair_outputs(ents, output_dir)
        side = named["dseg_json"]
        try:
            meta = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict):
            meta = None
        missing = missing_outputs(output_dir, side, meta)
        if missing is None:
            unchecked.append(_rel(side, Path(output_dir)))
        meta = meta or {}
        df["source_sha256"] = meta.get("SourceSHA256", "")
        df["model_sha256"] = meta.get("ModelSHA256", "")
        sources = meta.get("Sources")
        df["flair_source"] = sources[0] if isinstance(sources, list) and sources and isinstance(sources[0], str) else ""
        used, n_card = meta.get("ModelMembersUsed"), meta.get("ModelMembers")
        # the whole ensemble, or a sidecar written before --members existed: ""
        subset = isinstance(used, list) and used != list(range(n_card if isinstance(n_card, int) else len(used)))
        df["model_members"] = " ".join(map(str, used)) if subset else ""
        df["inference_options"] = inference_options(meta)
        df["qc_messages"] = "; ".join(meta.get("QCWarnings", []))
        df["prefix"] = prefix = output_prefix(ents)
        df["qc_incomplete"] = bool(missing)
        # a FLAIR still being written (array tasks finish at different times) is no reason to re-run
        # it; the lock is tested only here, for the few incomplete FLAIRs
        busy = bool(missing) and flair_lock_held(output_dir, prefix)
        df["qc_incomplete_message"] = [BEING_PROCESSED if busy else _incomplete_message(missing, pid) if missing
                                       else "" for pid in df["participant_id"]]
        df["report"] = named["report"].name if named["report"].is_file() else ""
        frames.append(df)
    if unchecked:
        LOGGER.warning("%d dseg sidecar(s) have no 'Outputs' list (written by an older ms3seg-app), so their "
                       "completeness is not checked: %s%s", len(unchecked), ", ".join(unchecked[:3]),
                       " ..." if len(unchecked) > 3 else "")
    df = pd.concat(frames, ignore_index=True)
    for col in ("session_id", "acq", "run"):  # BIDS writes missing entities as n/a
        df[col] = df[col].fillna("n/a")
    return df.sort_values(KEYS, key=label_sort_key).reset_index(drop=True)


def robust_z(x: pd.Series) -> pd.Series:
    """(x - median) / (1.4826 MAD); 0 where the MAD is 0 (Iglewicz & Hoaglin 1993)."""
    x = pd.to_numeric(x, errors="coerce")
    med = x.median()
    mad = (x - med).abs().median() * 1.4826
    if not mad or not np.isfinite(mad):
        return pd.Series(0.0, index=x.index)
    return (x - med) / mad


def add_qc_flags(df: pd.DataFrame, training_geometry: dict | None = None,
                 geometries: dict | None = None) -> pd.DataFrame:
    """Add QC flag columns.

    - ``qc_duplicate_input``: the same FLAIR content (sha256) under another subject/session;
    - ``qc_outlier_icv`` / ``qc_outlier_lesion``: robust |z| > 3.5 of ICV / lesion volume
      (only with >= 5 FLAIRs);
    - ``qc_geometry``: slice thickness or in-plane size outside what the model saw: the
      training geometry of the model each row's sidecar names (``geometries``, keyed by
      model sha256), else ``training_geometry``;
    - ``qc_model_differs``: segmented by another model, or another subset of its ensemble
      members (``--members``), or other inference options, than most complete FLAIRs of the
      group (every complete row when no setting has a majority): their burdens are not
      directly comparable, yet the statistics pool them. Rows with ``qc_incomplete`` neither
      vote nor are flagged: without a dseg sidecar they name no model;
    - ``qc_flags``: all flags of the row, ``;``-separated (empty if none), including the
      ``incomplete (missing ...)`` message of :func:`collect_volumes` where present.
    """
    df = df.copy()
    tg = training_geometry or {"slice_thickness_mm": [4.0, 8.5], "inplane_mm": [0.7, 1.3]}
    sha = df["source_sha256"].replace("", np.nan)
    df["qc_duplicate_input"] = sha.notna() & sha.duplicated(keep=False)
    enough = len(df) >= 5
    df["qc_outlier_icv"] = enough & (robust_z(df["icv_ml"]).abs() > OUTLIER_Z)
    df["qc_outlier_lesion"] = enough & (robust_z(df["abnormal_wmh_ml"]).abs() > OUTLIER_Z)
    th = pd.to_numeric(df.get("slice_thickness_mm"), errors="coerce")
    ip = pd.to_numeric(df.get("inplane_mm"), errors="coerce")
    shas = df["model_sha256"] if "model_sha256" in df else pd.Series("", index=df.index)
    rows_tg = [(geometries or {}).get(s) or tg for s in shas]
    lo_t = pd.Series([g["slice_thickness_mm"][0] for g in rows_tg], index=df.index)
    hi_t = pd.Series([g["slice_thickness_mm"][1] for g in rows_tg], index=df.index)
    lo_i = pd.Series([g["inplane_mm"][0] for g in rows_tg], index=df.index)
    hi_i = pd.Series([g["inplane_mm"][1] for g in rows_tg], index=df.index)
    df["qc_geometry"] = (th < lo_t) | (th > hi_t) | (ip < lo_i) | (ip > hi_i)
    members = df["model_members"] if "model_members" in df else pd.Series("", index=df.index)
    inference = df["inference_options"] if "inference_options" in df else pd.Series("", index=df.index)
    model = shas.astype(str) + "|" + members.astype(str) + "|" + inference.astype(str)
    # incomplete rows (no sidecar yet: model "") would vote for a model no FLAIR was made with, and
    # with a tie flag complete ones; they are kept out of the statistics anyway
    voting = ~df["qc_incomplete"].astype(bool) if "qc_incomplete" in df else pd.Series(True, index=df.index)
    modes = model[voting].mode()
    # a tie has no majority: every voting row is flagged, the group mixes models or member sets evenly
    differs = (model != modes.iloc[0]) if len(modes) == 1 else pd.Series(model[voting].nunique() > 1, index=df.index)
    df["qc_model_differs"] = differs & voting
    names = {"qc_duplicate_input": "identical input to another FLAIR", "qc_outlier_icv": "ICV outlier",
             "qc_outlier_lesion": "lesion-volume outlier", "qc_geometry": "geometry outside training",
             "qc_model_differs": "other model, members or inference options than most of the group"}
    flags = []
    for _, row in df.iterrows():
        msg = row.get("qc_incomplete_message")
        row_flags = [msg] if isinstance(msg, str) and msg else []
        flags.append(";".join(row_flags + [v for k, v in names.items() if row[k]]))
    df["qc_flags"] = flags
    return df


def selected_without_result(output_dir: Path, bids_dir: Path, df: pd.DataFrame) -> list[str]:
    """FLAIRs that a participant-level run selected and that have no result at all: its task was
    killed (SLURM time limit, SIGTERM/SIGKILL) before it wrote anything for them, or is still
    running and has not reached them.

    Every run that has FLAIRs to process lists them (``inputs``) in ``logs/config-<run>.json``
    before it starts; a FLAIR with a row in ``df`` (complete or not) is reported from there.

    Parameters
    ----------
    output_dir : Path
        The participant level's output folder.
    bids_dir : Path
        The BIDS dataset: a selected FLAIR no longer in it is not expected to have results.
    df : DataFrame
        The group table (:func:`collect_volumes`): ``prefix`` and ``flair_source``.

    Returns
    -------
    list of str
        The FLAIRs' prefixes (:func:`~ms3seg_app.derivatives.output_prefix`), each once, in the
        order the configs list them.
    """
    from .derivatives import flair_entities, output_prefix, raw_path, raw_uri

    sources = set(df["flair_source"]) if "flair_source" in df else set()
    prefixes = set(df["prefix"])
    seen, found, gone = set(), [], 0
    for config in sorted((Path(output_dir) / "logs").glob("config-*.json")):
        try:
            data = json.loads(config.read_text())
            run_bids, inputs = data.get("bids_dir"), data.get("inputs", [])
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            LOGGER.warning("%s not read (%s): FLAIRs that run selected and that have no result are not listed",
                           config, exc)
            continue
        if not isinstance(inputs, list) or not isinstance(run_bids, (str, type(None))):
            LOGGER.warning("%s: 'inputs' is not a list of paths: FLAIRs that run selected and that have no "
                           "result are not listed", config)
            continue
        for path in (Path(i) for i in inputs if isinstance(i, str)):
            # the URI the FLAIR's dseg sidecar names in Sources (as the participant level writes it, relative
            # to that run's dataset): most inputs have a result, found without naming their outputs (which
            # parses the name: milliseconds per FLAIR, seconds for a large dataset)
            uri = raw_uri(path, run_bids)
            if uri in sources or uri in seen:
                continue
            seen.add(uri)
            # a FLAIR removed from the dataset since (a discarded scan) is not expected to have results;
            # looked up relative to the dataset too, which the group level may see at another mount point
            if not (path.exists() or raw_path(uri, bids_dir).exists()):
                gone += 1
                continue
            prefix = output_prefix(flair_entities(path))
            if prefix not in prefixes:
                found.append(prefix)
    if gone:
        LOGGER.info("%d FLAIR(s) that participant-level runs selected are no longer in %s: no result is "
                    "expected for them", gone, bids_dir)
    return list(dict.fromkeys(found))


def missing_and_failed(output_dir: Path, bids_dir: Path, df: pd.DataFrame,
                       participants: pd.DataFrame | None = None) -> pd.DataFrame:
    """Participants of ``participants.tsv`` without results, FLAIRs with crash logs, and FLAIRs
    that a participant-level run selected and that have no result (:func:`selected_without_result`).

    The participant level moves a FLAIR's crash logs to ``logs/resolved/`` once it succeeds
    (:func:`~ms3seg_app.derivatives.resolve_crash_logs`), so ``logs/crash-*.txt`` are failures
    that still hold: each is listed, unless (output folders of earlier versions, which left
    them there) the FLAIR's results are complete (``df["qc_incomplete"]`` false) and their
    dseg sidecar is newer than the crash log. A FLAIR whose rerun failed is listed, even
    where an earlier run's tables are still there. A crash log moved to ``logs/resolved/``
    while it is read (a participant run that succeeds meanwhile) is left out.

    A selected FLAIR without any result is listed as ``being processed`` where a participant
    process holds its lock (:func:`flair_lock_held`), else as ``no result`` (its task was
    killed); not where it has a crash log (listed as failed). A participant of
    ``participants.tsv`` with such FLAIRs, or crash logs, is not listed again as a participant
    without results.

    Parameters
    ----------
    output_dir : Path
        The participant level's output folder.
    bids_dir : Path
        The BIDS dataset.
    df : DataFrame
        The group table (:func:`collect_volumes`): ``participant_id``, ``prefix``, and where
        present ``qc_incomplete``, ``flair_source``, ``session_id`` and ``session_rank``
        (:func:`order_sessions`).
    participants : DataFrame or None
        :func:`read_participants` of ``bids_dir`` if the caller has read it; else read here.

    Returns
    -------
    DataFrame
        ``participant_id``, ``flair`` (the FLAIR's prefix; ``n/a`` for a participant without
        results) and ``problem``; by participant, then in session order.
    """
    from .derivatives import flair_entities, flair_outputs

    rows = []
    incomplete = df["qc_incomplete"] if "qc_incomplete" in df else pd.Series(False, index=df.index)
    done = set(df.loc[~incomplete.astype(bool), "prefix"])
    reported, crashed_flairs = set(), set()  # participants, FLAIRs listed
    for crash in sorted((Path(output_dir) / "logs").glob("crash-*.txt")):
        prefix = prefix_from_crash_log(crash)
        if prefix in done:
            side = flair_outputs(flair_entities(prefix), output_dir)["dseg_json"]
            try:
                if side.stat().st_mtime >= crash.stat().st_mtime:  # failed once, succeeded later (older versions)
                    continue
            except OSError:
                pass
        try:
            lines = [ln for ln in crash.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:  # moved to logs/resolved/ since the glob: its FLAIR has just succeeded
            continue
        reported.add(prefix.split("_")[0])
        crashed_flairs.add(prefix)
        rows.append({"participant_id": prefix.split("_")[0], "flair": prefix,
                     "problem": "failed: " + (lines[-1][:300] if lines else "see " + crash.name)})
    for prefix in selected_without_result(output_dir, bids_dir, df):
        if prefix in crashed_flairs:  # listed above, as failed
            continue
        participant = prefix.split("_")[0]
        reported.add(participant)
        rows.append({"participant_id": participant, "flair": prefix,
                     "problem": BEING_PROCESSED if flair_lock_held(output_dir, prefix)
                     else _no_result_message(participant)})
    listed = (read_participants(bids_dir) if participants is None else participants)["participant_id"]
    for p in sorted(set(listed) - set(df["participant_id"]) - reported):
        rows.append({"participant_id": p, "flair": "n/a", "problem": "no participant-level result"})
    out = pd.DataFrame(rows, columns=["participant_id", "flair", "problem"]).drop_duplicates()
    # in the group table's session order; sessions without any result after the others
    rank = dict(zip(zip(df["participant_id"], df["session_id"]), df["session_rank"])) if "session_rank" in df else {}
    out["session_rank"] = [rank.get((p, f"ses-{flair_entities(f).get('session')}"), len(rank))
                           for p, f in zip(out["participant_id"], out["flair"])]
    return out.sort_values(["participant_id", "session_rank", "flair"], key=_label_or_number) \
        .drop(columns="session_rank").reset_index(drop=True)


def age_band(age) -> str:
    """MS3SEG/MRI_MS_Insights age bands: 18-29, 30-39, 40-49, 50-59, 60+ (``n/a`` otherwise)."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "n/a"
    for lo, hi in AGE_BANDS:
        if lo <= a <= hi + 0.999:
            return f"{lo}+" if hi >= 200 else f"{lo}-{hi}"
    return "n/a"


def baseline(df: pd.DataFrame) -> pd.DataFrame:
    """One row per participant, the unit of the cross-sectional tests: its first FLAIR in
    session order (first session, then acq, run), taken whole.

    Parameters
    ----------
    df : DataFrame
        One row per FLAIR; in the order of :func:`order_sessions` (``session_rank``) if it has
        been applied with the BIDS dataset, else sessions by their labels.

    Returns
    -------
    DataFrame, one row per participant with all of ``df``'s columns (a missing value stays
    missing: never filled from another session).
    """
    return order_sessions(df).drop_duplicates("participant_id").reset_index(drop=True)


def mann_whitney(a, b) -> dict:
    """Two-sided Mann-Whitney U with effect size r = |Z| / sqrt(N) (Rosenthal 1991).

    Z from the normal approximation with tie correction (scipy's asymptotic p-value).
    """
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    res = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic")
    n1, n2 = len(a), len(b)
    ranks = stats.rankdata(np.concatenate([a, b]))
    _, counts = np.unique(ranks, return_counts=True)
    n = n1 + n2
    sigma = np.sqrt(n1 * n2 / 12.0 * ((n + 1) - (counts ** 3 - counts).sum() / (n * (n - 1))))
    z = (res.statistic - n1 * n2 / 2.0) / sigma if sigma > 0 else 0.0
    return {"statistic": float(res.statistic), "p": float(res.pvalue), "effect_size": float(abs(z) / np.sqrt(n)),
            "effect_measure": "r"}


def statistics(df: pd.DataFrame, min_group: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-sectional statistics on one row per participant (baseline session).

    Tests, each run only where the data allow (``min_group`` participants per group):
    Spearman correlation of each burden measure with age; Mann-Whitney U by sex (effect
    size r); Mann-Whitney U (two groups) or Kruskal-Wallis H (more) by the ``group``
    column; Kruskal-Wallis H across age bands. p-values are Bonferroni-corrected over
    all tests performed (``p_bonferroni = min(1, p * m)``).

    Returns
    -------
    (tests, age_bands) DataFrames. ``age_bands`` holds n, median and IQR of each burden
    measure per band and the periventricular share of lesion volume.
    """
    from scipy import stats

    base = baseline(df)
    tests = []
    measures = [m for m in BURDEN if m in base]
    age = pd.to_numeric(base.get("age"), errors="coerce") if "age" in base else None
    if age is not None and age.notna().sum() >= min_group:
        for m in measures:
            ok = age.notna() & base[m].notna()
            if ok.sum() >= min_group and base.loc[ok, m].nunique() > 1:
                rho, p = stats.spearmanr(age[ok], base.loc[ok, m])
                tests.append({"measure": m, "factor": "age", "test": "Spearman correlation", "n": int(ok.sum()),
                              "statistic": float(rho), "p": float(p), "effect_size": float(rho),
                              "effect_measure": "rho"})
    for factor in ("sex", "group"):
        if factor not in base:
            continue
        levels = [lv for lv, g in base.groupby(factor) if len(g) >= min_group and str(lv) not in ("n/a", "nan")]
        if len(levels) < 2:
            continue
        for m in measures:
            groups = [base.loc[base[factor] == lv, m].dropna() for lv in levels]
            if min(len(g) for g in groups) < min_group:
                continue
            if len(levels) == 2:
                r = mann_whitney(*groups)
                tests.append({"measure": m, "factor": f"{factor} ({levels[0]} vs {levels[1]})",
                              "test": "Mann-Whitney U", "n": int(sum(map(len, groups))), **r})
            else:
                h, p = stats.kruskal(*groups)
                tests.append({"measure": m, "factor": factor, "test": "Kruskal-Wallis H",
                              "n": int(sum(map(len, groups))), "statistic": float(h), "p": float(p),
                              "effect_size": float("nan"), "effect_measure": ""})
    band_rows = []
    if age is not None:
        base = base.assign(age_band=[age_band(a) for a in base["age"]])
        bands = [b for b, g in base.groupby("age_band") if b != "n/a" and len(g) >= min_group]
        if len(bands) >= 2:
            for m in measures:
                groups = [base.loc[base["age_band"] == b, m].dropna() for b in bands]
                if min(map(len, groups)) >= min_group:
                    h, p = stats.kruskal(*groups)
                    tests.append({"measure": m, "factor": "age band", "test": "Kruskal-Wallis H",
                                  "n": int(sum(map(len, groups))), "statistic": float(h), "p": float(p),
                                  "effect_size": float("nan"), "effect_measure": ""})
        for b, g in base.groupby("age_band"):
            row = {"age_band": b, "n": len(g)}
            for m in measures:
                row[f"{m}_median"] = g[m].median()
                row[f"{m}_q1"] = g[m].quantile(0.25)
                row[f"{m}_q3"] = g[m].quantile(0.75)
            row["periventricular_share_median"] = g["lesion_periventricular_share"].median() \
                if "lesion_periventricular_share" in g else float("nan")
            band_rows.append(row)
    t = pd.DataFrame(tests, columns=["measure", "factor", "test", "n", "statistic", "p", "effect_size",
                                     "effect_measure"])
    if len(t):
        t["p_bonferroni"] = np.minimum(1.0, t["p"] * len(t))
    else:
        t["p_bonferroni"] = []
    return t, pd.DataFrame(band_rows)


def run_group(bids_dir: Path, output_dir: Path, longitudinal: bool = True, report: bool = True) -> Path:
    """Write the group tables (and report) from the participant results in ``output_dir``.

    FLAIRs with incomplete results are listed in the QC table (flag ``incomplete``) and
    left out of the statistics and the longitudinal change; this is not an error.

    Parameters
    ----------
    bids_dir : Path
        The BIDS dataset (``participants.tsv`` covariates; FLAIRs for the registration).
    output_dir : Path
        The participant level's output folder, where the group files are written.
    longitudinal : bool
        Compute the change between consecutive sessions (ANTsPy registration).
    report : bool
        Write ``group.html``.

    Returns
    -------
    Path of ``group_desc-trimask_volumes.tsv``.

    Raises
    ------
    InputDataError
        If ``output_dir`` holds no participant results.
    """
    output_dir = Path(output_dir)
    df = order_sessions(collect_volumes(output_dir), bids_dir)
    df = add_qc_flags(df, None, _model_geometries(output_dir, df)).drop(columns=["qc_incomplete_message"], errors="ignore")  # now in qc_flags
    cov = read_participants(bids_dir)
    cov = cov.drop(columns=[c for c in cov.columns if c in df.columns and c != "participant_id"])
    df = df.merge(cov, on="participant_id", how="left")
    qc = missing_and_failed(output_dir, bids_dir, df, cov)
    flagged = df[df["qc_flags"] != ""]
    qc = pd.concat([qc, pd.DataFrame({"participant_id": flagged["participant_id"],
                                      "flair": flagged["prefix"],
                                      "problem": flagged["qc_flags"]})], ignore_index=True)
    complete = df[~df["qc_incomplete"]] if "qc_incomplete" in df else df
    if len(complete) < len(df):
        LOGGER.warning("%d FLAIR(s) with incomplete results are left out of the statistics (see %s)",
                       len(df) - len(complete), QC_TABLE)
    tests, bands = statistics(complete)
    from .derivatives import read_class_table

    classes = None
    if longitudinal or report:
        try:  # read once: lesion label of the longitudinal changes, colours of the report
            classes = read_class_table(output_dir)
        except (OSError, KeyError, ValueError) as exc:
            LOGGER.warning("class table not read (%s):%s%s", exc,
                           " no lesion changes between sessions;" if longitudinal else "",
                           " the group report uses the MS3SEG colours" if report else "")
    long = pd.DataFrame()
    if longitudinal:
        from .longitudinal import longitudinal_changes

        long = longitudinal_changes(complete, bids_dir, output_dir, classes)
    out = output_dir / GROUP_TABLE
    atomic_write_text(out, _tsv(df.drop(columns=["session_rank", "session_order"])))
    atomic_write_text(output_dir / STATS_TABLE, _tsv(tests))
    atomic_write_text(output_dir / AGEBAND_TABLE, _tsv(bands))
    atomic_write_text(output_dir / LONG_TABLE, _tsv(long))
    atomic_write_text(output_dir / QC_TABLE, _tsv(qc))
    if report:
        from .reports.group import write_group_report

        write_group_report(output_dir / GROUP_OUTPUTS["report"], df, tests, bands, long, qc, classes=classes)
    LOGGER.info("wrote %s (%d FLAIRs, %d QC entries, %d tests)", out, len(df), len(qc), len(tests))
    return out


def _model_geometries(output_dir: Path, df: pd.DataFrame) -> dict:
    """Training geometry of each model the participant sidecars name (by card sha256).

    The participant level copies the card it used into ``models/`` of the output folder;
    a card that cannot be found there is looked up as the bundled one, else skipped
    (the default geometry then applies).
    """
    from .derivatives import read_used_card

    out = {}
    for sha in sorted(set(df.get("model_sha256", pd.Series(dtype=str))) - {""}):
        card = read_used_card(output_dir, sha)
        if card is not None:
            out[sha] = card.get("training_geometry")
    return out
