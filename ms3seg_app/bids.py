"""Finding inputs with pybids (never glob) and validating BIDS labels."""
from __future__ import annotations

import codecs
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .exceptions import InputDataError, UsageError

LOGGER = logging.getLogger("ms3seg.bids")
LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


def validate_label(label: str, what: str = "participant") -> str:
    """Strip ``sub-``/``ses-`` and check a BIDS label (alphanumeric only).

    Raises
    ------
    UsageError
        For labels such as ``../x`` or ``a/b`` that could escape the output folder.
    """
    label = str(label)
    for prefix in ("sub-", "ses-"):
        if label.startswith(prefix):
            label = label[len(prefix):]
    if not LABEL_RE.match(label):
        raise UsageError(f"invalid {what} label {label!r}: BIDS labels are letters and digits only")
    return label


@dataclass
class FlairInput:
    """One FLAIR to process, with its entities and same-session anatomicals."""

    path: Path
    entities: dict
    t1w: Path | None = None
    t2w: Path | None = None
    metadata: dict = field(default_factory=dict)
    #: Why this FLAIR cannot be processed (e.g. its sidecar is not valid JSON), naming the
    #: file and the fix; ``None`` if it can. The caller reports it as failed and goes on.
    error: str | None = None

    @property
    def prefix(self) -> str:
        """``sub-X[_ses-Y][_acq-Z][_run-N]...`` naming the outputs of this FLAIR
        (:func:`~ms3seg_app.derivatives.output_prefix`)."""
        from .derivatives import output_prefix

        return output_prefix(self.entities)


#: Anatomicals of a FLAIR's session that are found and co-registered to it.
COREGISTERED = ("T1w", "T2w")


def label_sort_key(values):
    """Sort key that orders BIDS labels with numbers by their value: ``ses-2`` before ``ses-10``,
    ``m6`` before ``m12`` (text order puts ``10`` before ``2``).

    Parameters
    ----------
    values : pandas.Series of str
        Labels (e.g. ``session_id`` values), for ``DataFrame.sort_values(..., key=label_sort_key)``.

    Returns
    -------
    pandas.Series of str
        The labels with every run of digits zero-padded to 20 places, so that text order is
        the numeric one (written here rather than taking ``natsort``, not a dependency, for one
        regular expression).
    """
    return values.astype(str).str.replace(r"\d+", lambda m: m.group().zfill(20), regex=True)


#: Queries a ``--bids-filter-file`` may hold (fMRIPrep's format, restricted to ours).
FILTER_QUERIES = ("flair", "t1w", "t2w")


def load_filters(path: Path | None) -> dict:
    """Read and check a ``--bids-filter-file``.

    The file holds fMRIPrep-style pybids filters per query, e.g.
    ``{"flair": {"acquisition": "axial"}, "t1w": {"reconstruction": null}}``.

    Parameters
    ----------
    path : Path or None
        The JSON file; ``None`` gives no filters.

    Returns
    -------
    dict
        ``{query: {entity: value}}`` for the queries ``flair``, ``t1w``, ``t2w``.

    Raises
    ------
    UsageError
        If the file cannot be read, is not valid JSON, is not an object, names a query
        other than ``flair``/``t1w``/``t2w``, or a query's value is not an object. The
        message names the file.
    """
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise UsageError(f"cannot read the BIDS filter file {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"the BIDS filter file {path} is not valid JSON ({exc}); "
                         'write e.g. {"flair": {"acquisition": "axial"}}') from exc
    if not isinstance(data, dict):
        raise UsageError(f"the BIDS filter file {path} must hold a JSON object such as "
                         f'{{"flair": {{"acquisition": "axial"}}}}, not a {type(data).__name__}')
    unknown = sorted(set(data) - set(FILTER_QUERIES))
    if unknown:
        raise UsageError(f"the BIDS filter file {path} has unknown quer{'ies' if len(unknown) > 1 else 'y'} "
                         f"{', '.join(map(repr, unknown))}: only {', '.join(FILTER_QUERIES)} are used")
    for query, value in data.items():
        if not isinstance(value, dict):
            raise UsageError(f"the BIDS filter file {path}: {query!r} must map to an object of pybids "
                             f"entities (e.g. {{\"session\": \"01\"}}), not a {type(value).__name__}")
    return data


def _read_sidecar(path: Path, bids_dir: Path) -> tuple[dict, str | None]:
    """One JSON sidecar as ``(metadata, error)``; ``error`` names the file and the fix.

    A UTF-8 byte-order mark is tolerated with a warning (the BIDS specification asks for
    UTF-8 without one, but scanners' export tools write it).
    """
    try:
        rel = Path(path).relative_to(bids_dir).as_posix()
    except ValueError:
        rel = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return {}, f"{rel}: cannot read the sidecar ({exc.strerror or exc}); fix its permissions or delete it"
    if raw.startswith(codecs.BOM_UTF8):
        LOGGER.warning("%s starts with a UTF-8 byte-order mark (BIDS asks for UTF-8 without one); "
                       "read anyway", rel)
    constants = []

    def _null(name):  # NaN, Infinity, -Infinity: Python's json reads them, JSON does not have them
        constants.append(name)
        return None

    try:
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=_null)
    except UnicodeDecodeError as exc:
        return {}, f"{rel}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 or delete it"
    except json.JSONDecodeError as exc:
        return {}, (f"{rel}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                    "fix or delete the sidecar")
    if not isinstance(data, dict):
        return {}, (f"{rel}: holds a JSON {type(data).__name__}, not an object of metadata; "
                    "fix or delete the sidecar")
    if constants:
        LOGGER.warning("%s holds %s, which JSON does not allow; read as null (write null, or leave the field out)",
                       rel, ", ".join(sorted(set(constants))))
    return data, None


def _sidecar_index(layout) -> dict:
    """Every FLAIR sidecar of the dataset by folder: ``{folder: [(entities, path)]}``."""
    index: dict = {}
    for js in layout.get(suffix="FLAIR", extension=".json", return_type="object"):
        ents = {k: v for k, v in js.get_entities().items() if k not in ("suffix", "extension")}
        index.setdefault(Path(js.path).parent, []).append((ents, js.path))
    return index


def _flair_metadata(flair, index: dict, root: Path, cache: dict) -> tuple[dict, str | None]:
    """Metadata of one FLAIR merged from its sidecars (BIDS inheritance principle).

    A sidecar applies if it lies in the FLAIR's folder or one above it and its entities
    are a subset of the FLAIR's; nearer and more specific sidecars override the others.
    This is the rule of pybids' own metadata indexer, which is switched off because it
    reads every sidecar of the dataset at once and raises on the first bad one; pybids'
    ``get_nearest`` is not used because it queries the database again for every FLAIR
    (quadratic: 50 s for 600 subjects) and also accepts sidecars with extra entities.
    Each sidecar file is read once (``cache``).
    """
    ents = {k: v for k, v in flair.get_entities().items() if k not in ("suffix", "extension")}
    folder = Path(flair.path).parent
    chain = [folder, *folder.parents]
    applicable = []
    for depth, d in enumerate(chain):
        for js_ents, js_path in index.get(d, ()):
            if all(k in ents and ents[k] == v for k, v in js_ents.items()):
                applicable.append((-depth, len(js_ents), js_path))
        if d == root:
            break
    merged = {}
    for _, _, js_path in sorted(applicable):  # farthest and least specific first: the nearer override
        if js_path not in cache:
            cache[js_path] = _read_sidecar(Path(js_path), root)
        data, err = cache[js_path]
        if err is not None:
            return {}, err
        merged.update(data)
    return dict(sorted(merged.items())), None


def index_ignore(participant_labels=None) -> list:
    """What pybids leaves out of the index (``BIDSLayoutIndexer(ignore=...)``): its defaults
    (``DEFAULT_LOCATIONS_TO_IGNORE``: ``code``, ``sourcedata``, ...) and, when participants are
    selected, every other participant's folder.

    A cluster runs one participant per task: indexing the whole dataset in each took 21.6 s
    for 1000 participants (8000 files) against 1.3 s for the selected one's folder (2 cores,
    2026-12-03). Patterns are matched against paths relative to the dataset with a leading
    ``/`` (pybids' ``_check_path_matches_patterns``).

    Parameters
    ----------
    participant_labels : list of str, optional
        Labels without ``sub-``; None or empty: the whole dataset is indexed.

    Returns
    -------
    list of str and compiled regular expressions
    """
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    ignore = sorted(DEFAULT_LOCATIONS_TO_IGNORE, key=str)
    if participant_labels:
        keep = "|".join(re.escape(label) for label in sorted(participant_labels))
        ignore.append(re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))"))
    return ignore


def collect_inputs(bids_dir: Path, participant_labels=None, session_labels=None, filters=None,
                   layout=None) -> tuple[list[FlairInput], list[str]]:
    """Every FLAIR of the selected participants and sessions, with T1w/T2w of the same session.

    Parameters
    ----------
    bids_dir : Path
        BIDS raw dataset root.
    participant_labels, session_labels : list of str, optional
        Labels without prefix; default all.
    filters : dict, optional
        Extra pybids filters per query name (``flair``, ``t1w``, ``t2w``).

    Returns
    -------
    (inputs, without_flair) : list of FlairInput sorted by path, and the selected
        participant labels that have no FLAIR (reported and skipped by the caller).
        A FLAIR whose sidecar cannot be read (not UTF-8, not JSON, not an object) is
        returned with ``metadata={}`` and ``error`` set to a message naming the file
        and the fix: the caller reports it as failed and processes the others. So are
        FLAIRs whose names would give the same outputs (they differ only in entities
        outside :data:`~ms3seg_app.derivatives.NAME_ENTITIES`): each gets an ``error``.

    Raises
    ------
    InputDataError
        If a requested participant does not exist, or no FLAIR matches at all.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    filters = filters or {}
    if layout is None:
        # Sidecars are not read while indexing: pybids' metadata indexer raises on the first
        # malformed JSON of the dataset and no FLAIR at all would be processed. They are read
        # per FLAIR below instead, so a bad one fails only the FLAIRs it applies to.
        layout = BIDSLayout(str(bids_dir), validate=False, derivatives=False,
                            indexer=BIDSLayoutIndexer(validate=False, index_metadata=False,
                                                      ignore=index_ignore(participant_labels)))
    subjects = layout.get_subjects()
    if participant_labels:
        missing = sorted(set(participant_labels) - set(subjects))
        if missing:
            # the index holds the selected participants only: the others are listed from the folder
            available = sorted(p.name[4:] for p in Path(bids_dir).iterdir() if p.is_dir() and p.name.startswith("sub-"))
            raise InputDataError(f"participant(s) {missing} not found in {bids_dir} "
                                 f"(available: {available})")
        subjects = sorted(participant_labels)
    query = {"suffix": "FLAIR", "datatype": "anat", "extension": [".nii", ".nii.gz"],
             "subject": subjects, **filters.get("flair", {})}
    if session_labels:
        query["session"] = list(session_labels)
    found = layout.get(return_type="object", invalid_filters="error", **query)
    if not found:
        raise InputDataError(f"no FLAIR found in {bids_dir} for the filters {query}; "
                             "FLAIRs must be named sub-<label>[_ses-<label>]_FLAIR.nii[.gz] in anat/")
    from .derivatives import NAME_ENTITIES  # here, not at the top: --version imports this module, not nibabel

    out = []
    sidecars: dict = {}
    sidecar_index = _sidecar_index(layout)
    root = Path(layout.root)
    for f in sorted(found, key=lambda x: x.path):
        ents = {k: v for k, v in f.get_entities().items() if k in NAME_ENTITIES}
        same = {"subject": ents["subject"], "datatype": "anat", "extension": [".nii", ".nii.gz"]}
        if ents.get("session") is not None:
            same["session"] = ents["session"]
        anat = {}
        for suffix in COREGISTERED:
            hits = layout.get(return_type="file", suffix=suffix, invalid_filters="error",
                              **{**same, **filters.get(suffix.lower(), {})})
            if ents.get("session") is None:
                hits = [h for h in hits if "ses-" not in Path(h).name]
            anat[suffix] = Path(sorted(hits)[0]) if hits else None
            if len(hits) > 1:
                LOGGER.warning("%s: %d %s images, using %s", f.path, len(hits), suffix, hits[0])
        metadata, error = _flair_metadata(f, sidecar_index, root, sidecars)
        if error is not None:
            LOGGER.warning("%s: %s", Path(f.path).name, error)
        out.append(FlairInput(Path(f.path), ents, anat["T1w"], anat["T2w"], metadata, error))
    # outputs are named by NAME_ENTITIES: two FLAIRs named alike would overwrite each other
    by_prefix: dict = {}
    for fi in out:
        by_prefix.setdefault(fi.prefix, []).append(fi)
    for prefix, same in by_prefix.items():
        if len(same) > 1:
            names = ", ".join(fi.path.name for fi in same)
            for fi in same:
                fi.error = (f"{names} would write the same outputs ({prefix}): they differ only in entities "
                            f"that do not name outputs; rename them or select one with --bids-filter-file")
    with_flair = {fi.entities["subject"] for fi in out}
    without = sorted(set(subjects) - with_flair)
    return out, without
