"""Finding inputs with pybids (never glob) and validating BIDS labels."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .exceptions import InputDataError, UsageError

LOGGER = logging.getLogger("ms3seg.bids")
LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
#: Entities that name a FLAIR's outputs, in BIDS filename order.
NAME_ENTITIES = ("subject", "session", "acquisition", "ceagent", "reconstruction", "run")
_SHORT = {"subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce",
          "reconstruction": "rec", "run": "run"}


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

    @property
    def prefix(self) -> str:
        """``sub-X[_ses-Y][_acq-Z][_run-N]`` naming the outputs of this FLAIR."""
        parts = []
        for ent in NAME_ENTITIES:
            if self.entities.get(ent) is not None:
                parts.append(f"{_SHORT[ent]}-{self.entities[ent]}")
        return "_".join(parts)

    @property
    def subdir(self) -> Path:
        """``sub-X[/ses-Y]/anat`` relative to the output folder."""
        p = Path(f"sub-{self.entities['subject']}")
        if self.entities.get("session") is not None:
            p = p / f"ses-{self.entities['session']}"
        return p / "anat"


def load_filters(path: Path | None) -> dict:
    """Read a ``--bids-filter-file`` (fMRIPrep format: ``{"flair": {...}, "t1w": {...}}``)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the BIDS filter file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the BIDS filter file must hold a JSON object")
    return data


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

    Raises
    ------
    InputDataError
        If a requested participant does not exist, or no FLAIR matches at all.
    """
    from bids import BIDSLayout

    filters = filters or {}
    if layout is None:
        layout = BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    subjects = layout.get_subjects()
    if participant_labels:
        missing = sorted(set(participant_labels) - set(subjects))
        if missing:
            raise InputDataError(f"participant(s) {missing} not found in {bids_dir} "
                                 f"(available: {sorted(subjects)})")
        subjects = sorted(participant_labels)
    query = {"suffix": "FLAIR", "datatype": "anat", "extension": [".nii", ".nii.gz"],
             "subject": subjects, **filters.get("flair", {})}
    if session_labels:
        query["session"] = list(session_labels)
    found = layout.get(return_type="object", invalid_filters="error", **query)
    if not found:
        raise InputDataError(f"no FLAIR found in {bids_dir} for the filters {query}; "
                             "FLAIRs must be named sub-<label>[_ses-<label>]_FLAIR.nii[.gz] in anat/")
    out = []
    for f in sorted(found, key=lambda x: x.path):
        ents = {k: v for k, v in f.get_entities().items() if k in NAME_ENTITIES}
        same = {"subject": ents["subject"], "datatype": "anat", "extension": [".nii", ".nii.gz"]}
        if ents.get("session") is not None:
            same["session"] = ents["session"]
        anat = {}
        for suffix in ("T1w", "T2w"):
            hits = layout.get(return_type="file", suffix=suffix, invalid_filters="error",
                              **{**same, **filters.get(suffix.lower(), {})})
            if ents.get("session") is None:
                hits = [h for h in hits if "ses-" not in Path(h).name]
            anat[suffix] = Path(sorted(hits)[0]) if hits else None
            if len(hits) > 1:
                LOGGER.warning("%s: %d %s images, using %s", f.path, len(hits), suffix, hits[0])
        out.append(FlairInput(Path(f.path), ents, anat["T1w"], anat["T2w"], f.get_metadata()))
    with_flair = {fi.entities["subject"] for fi in out}
    without = sorted(set(subjects) - with_flair)
    return out, without
