"""Writing BIDS-Derivatives: atomic files, names, top-level metadata.

Every file appears atomically: it is written to a temporary name in the destination
folder and renamed (``os.replace``), so a killed run never leaves a partial file.
Shared top-level files are written the same way, and only when their content
changes, so concurrent participant jobs cannot corrupt them.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from . import CLASSES, __version__

PIPELINE_NAME = "ms3seg-app"
BIDSIGNORE = ["*.html", "*_lesions.tsv", "*_volumes.tsv", "*_volumes.json", "*_lesions.json",
              "logs/", "figures/", "group_*"]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_save_nifti(img: nib.Nifti1Image, path: Path) -> Path:
    """Save a NIfTI atomically, with a reproducible gzip stream (no timestamp)."""
    import gzip
    import io

    raw = io.BytesIO()
    file_map = img.make_file_map({"image": raw, "header": raw})
    img.to_file_map(file_map)
    payload = raw.getvalue()
    if str(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
            gz.write(payload)
        payload = buf.getvalue()
    return atomic_write_bytes(path, payload)


def image_like(data: np.ndarray, ref: nib.Nifti1Image, dtype) -> nib.Nifti1Image:
    """A NIfTI on the reference grid: same shape, affine, qform/sform codes."""
    hdr = ref.header.copy() if isinstance(ref, nib.Nifti1Image) else None
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), ref.affine, hdr)
    img.set_data_dtype(dtype)
    qf, qc = ref.get_qform(coded=True) if isinstance(ref, nib.Nifti1Image) else (None, 0)
    sf, sc = ref.get_sform(coded=True) if isinstance(ref, nib.Nifti1Image) else (None, 0)
    img.set_qform(ref.affine, int(qc) or 1)
    img.set_sform(ref.affine, int(sc) or 1)
    img.header["scl_slope"] = np.nan
    img.header["scl_inter"] = np.nan
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    return img


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def write_top_level(output_dir: Path, container: dict | None = None) -> None:
    """``dataset_description.json``, ``desc-trimask_dseg.tsv`` and ``.bidsignore``.

    Deterministic content, written atomically and only if different: safe for many
    concurrent participant jobs on one output folder.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    gen = {"Name": PIPELINE_NAME, "Version": __version__,
           "CodeURL": "https://github.com/ms3seg/ms3seg-app"}
    if container:
        gen["Container"] = container
    desc = {"Name": "ms3seg-app tri-mask segmentation", "BIDSVersion": "1.10.0",
            "DatasetType": "derivative", "GeneratedBy": [gen],
            "HowToAcknowledge": "Cite the MS3SEG dataset paper (Bashiri Bawil et al., Scientific Data 2025) "
                                "and ms3seg-app."}
    _write_if_changed(output_dir / "dataset_description.json", json.dumps(desc, indent=2, sort_keys=True) + "\n")
    lines = ["index\tname\tabbreviation\tcolor"]
    lines += [f"{i}\t{n}\t{a}\t{c}" for i, (n, a, c) in CLASSES.items()]
    _write_if_changed(output_dir / "desc-trimask_dseg.tsv", "\n".join(lines) + "\n")
    _write_if_changed(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


#: Sidecar fields that may identify a person and are never copied into outputs.
IDENTIFYING_FIELDS = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                      "PatientWeight", "AccessionNumber", "InstitutionAddress", "ReferringPhysicianName",
                      "PerformingPhysicianName", "OperatorsName", "StudyID", "DeviceSerialNumber",
                      "AcquisitionDateTime", "AcquisitionDate", "StudyDate", "SeriesDate"}


def safe_metadata(meta: dict) -> dict:
    """Acquisition metadata from a sidecar, without identifying DICOM fields."""
    return {k: v for k, v in (meta or {}).items() if k not in IDENTIFYING_FIELDS}
