"""Writing BIDS-Derivatives: the names of every output, atomic files, clean headers, top-level metadata.

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

from . import __version__

PIPELINE_NAME = "ms3seg-app"
BIDSIGNORE = ["*.html", "*_lesions.tsv", "*_volumes.tsv", "logs/", "models", "group_*"]  # "models/" is not honoured by bids-validator-deno 2.x


def _file_mode() -> int:
    """Mode of a new file under the process's umask (0o644 under 022, 0o664 under 002 for a lab's
    group-shared folder, 0o600 under 077), as ``open()`` creates files. Python has no call that
    reads the umask without setting it (``os.umask`` returns the old value), so it is set and put
    back at once; called once, when this module is imported."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


#: What :func:`atomic_write_bytes` gives its files (``mkstemp`` creates them 0o600)
FILE_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename),
    with the permissions the umask gives a new file (:data:`FILE_MODE`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> Path:
    """Write ``obj`` as JSON (indented, keys sorted), atomically.

    Parameters
    ----------
    path : Path
        The file to write (replaced whole, or left as it was).
    obj : dict, list or scalar
        JSON-like; numpy integers and floats and Paths are converted, NaN and infinities
        (which JSON does not have: the BIDS validator rejects them) are written as null.

    Returns
    -------
    Path
        ``path``.
    """
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default,
                                              allow_nan=False) + "\n")


def _finite(o):
    """``o`` with every non-finite float replaced by None (hand-written: the json module has no
    hook for floats, and writes NaN, which is not JSON and which the BIDS validator rejects)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_save_nifti(img: nib.Nifti1Image, path: Path) -> Path:
    """Save a NIfTI atomically, with a reproducible gzip stream (no timestamp).

    nibabel writes the image straight into the gzip stream, so memory holds the compressed
    bytes, not an uncompressed copy of the image and a copy of that (2 x 79 MB for a
    512x512x300 uint8 map); the bytes are those of compressing the uncompressed file (test).
    """
    import gzip
    import io

    buf = io.BytesIO()
    if str(path).endswith(".gz"):
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
            img.to_file_map(img.make_file_map({"image": gz, "header": gz}))
    else:
        img.to_file_map(img.make_file_map({"image": buf, "header": buf}))
    return atomic_write_bytes(path, buf.getbuffer())


def image_like(data: np.ndarray, ref: nib.spatialimages.SpatialImage, dtype) -> nib.Nifti1Image:
    """A NIfTI on the reference grid with a clean header: geometry only.

    The header is built new (as fMRIPrep does): shape, voxel sizes, spatial/temporal
    units, and the reference's qform and sform with their codes (a code of 0 stays 0).
    Nothing else is copied: no ``descrip``, ``aux_file``, ``intent_name``, ``db_name``
    and no header extensions, since these free-text fields can carry identifying data
    (names, birth dates) written by converters.

    Parameters
    ----------
    data : ndarray (I, J, K), same shape as ``ref``
    ref : nibabel image (the input FLAIR)
    dtype : numpy dtype of the stored voxels

    Returns
    -------
    Nifti1Image
    """
    arr = np.asarray(data).astype(dtype, copy=False)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(arr, None, hdr)
    if isinstance(ref, nib.Nifti1Image):
        qf, qc = ref.get_qform(coded=True)
        sf, sc = ref.get_sform(coded=True)
        space_u, time_u = ref.header.get_xyzt_units()
        # NIfTI coordinates are millimetres unless said otherwise; "unknown" is written as mm
        img.header.set_xyzt_units("mm" if space_u == "unknown" else space_u,
                                  "sec" if time_u == "unknown" else time_u)
    else:  # other formats carry one affine: record it as scanner coordinates
        qf, qc, sf, sc = ref.affine, 1, ref.affine, 1
        img.header.set_xyzt_units("mm", "sec")
    img.set_qform(qf if qc else None, int(qc) if qc else 0)
    img.set_sform(sf if sc else None, int(sc) if sc else 0)
    if not qc and not sc:  # unreachable for checked inputs; keep geometry rather than lose it
        img.set_sform(ref.affine, 1)
    if not qc:  # pixdim belongs to the qform (set_qform wrote it): without one, the sform's voxel sizes
        img.header.set_zooms(tuple(float(z) for z in nib.affines.voxel_sizes(img.affine)[:3]))
    img.header.set_slope_inter(np.nan, np.nan)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    img.header["descrip"] = f"{PIPELINE_NAME} {__version__}".encode()[:80]
    return img


#: Slices of a probability map quantised at a time (:func:`probability_image`).
PROBABILITY_CHUNK_SLICES = 16


def probability_image(prob: np.ndarray, ref: nib.spatialimages.SpatialImage,
                      box: tuple | None = None, outside: float = 0.0) -> nib.Nifti1Image:
    """A probability map stored compactly: uint8 with ``scl_slope`` 1/255.

    Parameters
    ----------
    prob : ndarray (I, J, K) float in [0, 1], or (I', J', K') with ``box``
    ref : nibabel image (the input FLAIR)
    box : tuple of 3 slices, optional
        The stored-order region of ``ref``'s grid that ``prob`` covers.
    outside : float in [0, 1], default 0
        The probability outside ``box`` (``Prediction.outside[c]``: 0 for a foreground
        class, 1 for the background); not used without ``box``.

    Raises
    ------
    ValueError
        If ``prob`` does not have the shape of ``ref``'s grid, or of ``box``.

    Returns
    -------
    Nifti1Image whose scaled data equal ``prob`` within 0.5/255; exact zeros stay 0.
    """
    # PROBABILITY_CHUNK_SLICES slices at a time, in prob's own dtype (the values of converting
    # the whole volume at once): three volume-sized temporaries (470 MB for a 512x512x300
    # float16 map) become three chunk-sized ones
    if box is None:
        if tuple(prob.shape) != tuple(ref.shape[:3]):
            raise ValueError(f"probabilities {prob.shape} are not on the grid of {ref.shape[:3]}; "
                             "give the box they cover")
        q = np.empty(prob.shape, np.uint8)
        inner = q
    else:
        q = np.zeros(ref.shape[:3], np.uint8)  # untouched pages of a zero fill take no memory
        if outside:
            q[...] = np.rint(np.clip(outside, 0.0, 1.0) * 255.0)
        inner = q[box]
        if inner.shape != prob.shape:
            raise ValueError(f"probabilities {prob.shape} do not fill the box {box} of {ref.shape[:3]}")
    for k in range(0, prob.shape[2], PROBABILITY_CHUNK_SLICES):
        part = np.clip(prob[:, :, k:k + PROBABILITY_CHUNK_SLICES], 0.0, 1.0)
        part *= 255.0
        inner[:, :, k:k + PROBABILITY_CHUNK_SLICES] = np.rint(part, out=part)
    img = image_like(q, ref, np.uint8)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    return img


# ---------------------------------------------------------------- names
#: BIDS-Derivatives path of every per-FLAIR image and table (pybids ``build_path`` syntax).
PATH_PATTERN = ("sub-{subject}[/ses-{session}]/anat/sub-{subject}[_ses-{session}][_task-{task}][_acq-{acquisition}]"
                "[_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}][_part-{part}][_space-{space}]"
                "[_chunk-{chunk}][_label-{label}][_desc-{desc}]_{suffix}{extension}")
#: The participant report, at the top of the output folder (as fMRIPrep's).
REPORT_PATTERN = ("sub-{subject}[_ses-{session}][_task-{task}][_acq-{acquisition}][_ce-{ceagent}]"
                  "[_rec-{reconstruction}][_run-{run}][_echo-{echo}][_part-{part}][_chunk-{chunk}].html")
#: Entities of an input FLAIR that name its outputs (in BIDS filename order: every entity the
#: specification allows in an anatomical file name, so two FLAIRs never share outputs).
NAME_ENTITIES = ("subject", "session", "task", "acquisition", "ceagent", "reconstruction", "run", "echo", "part",
                 "chunk")
#: Group-level outputs, at the top of the output folder.
GROUP_OUTPUTS = {"volumes": "group_desc-trimask_volumes.tsv", "stats": "group_desc-trimask_stats.tsv",
                 "agebands": "group_desc-trimask_agebands.tsv",
                 "longitudinal": "group_desc-trimask_longitudinal.tsv", "qc": "group_desc-trimask_qc.tsv",
                 "report": "group.html"}
CRASH_PREFIX = "crash-"


def _build(entities: dict, pattern: str, **extra) -> str:
    from bids.layout.writing import build_path

    ents = {k: entities[k] for k in NAME_ENTITIES if entities.get(k) is not None}
    ents.update(extra)
    path = build_path(ents, [pattern], strict=False)
    if path is None:
        raise ValueError(f"cannot name an output from entities {ents}")
    return path


#: Entities of the per-FLAIR outputs that every run writes (probability maps and co-registered
#: images are added per model and input by :func:`flair_outputs`).
OUTPUT_SPECS = {
    "dseg": dict(space="orig", desc="trimask", suffix="dseg", extension=".nii.gz"),
    "mask": dict(space="orig", desc="brain", suffix="mask", extension=".nii.gz"),
    "lesions": dict(space="orig", desc="trimask", suffix="lesions", extension=".tsv"),
    "volumes": dict(space="orig", desc="trimask", suffix="volumes", extension=".tsv"),
}


def find_outputs(output_dir: Path, key: str) -> list[Path]:
    """Every FLAIR's output ``key`` (of :data:`OUTPUT_SPECS`) under ``output_dir``, sorted.

    A path pattern rather than a pybids index: these are our own outputs with fixed names,
    and indexing a large output folder with pybids costs minutes.
    """
    spec = OUTPUT_SPECS[key]
    found = Path(output_dir).glob(f"sub-*/**/anat/sub-*_{spec['suffix']}{spec['extension']}")
    # kept where the FLAIR's entities read from the name give the same path back (entities such
    # as chunk sit between space and desc, so no fixed name tail tells the outputs apart)
    return sorted(f for f in found
                  if f == Path(output_dir) / _build(flair_entities(f), PATH_PATTERN, **spec))


def flair_entities(path: Path | str) -> dict:
    """BIDS entities (:data:`NAME_ENTITIES`) of a FLAIR, of one of its outputs or of its
    :func:`output_prefix`, from the file name alone (pybids ``parse_file_entities``; folders
    never count)."""
    from bids.layout import parse_file_entities

    # pybids matches "sub-" after a path separator: the name alone, rooted, so folders never count
    ents = parse_file_entities("/" + Path(path).name)
    return {k: ents[k] for k in NAME_ENTITIES if ents.get(k) is not None}


def flair_outputs(entities: dict, output_dir: Path, probseg_labels=(), modalities=()) -> dict[str, Path]:
    """Every file the participant level writes for one FLAIR: the one place outputs are named.

    Parameters
    ----------
    entities : dict
        BIDS entities of the input FLAIR (``subject``, and any of the other
        :data:`NAME_ENTITIES`: ``session``, ``task``, ``acquisition``, ``ceagent``,
        ``reconstruction``, ``run``, ``echo``, ``part``, ``chunk``).
    output_dir : Path
    probseg_labels : sequence of str
        Abbreviations of the classes with a probability map (the card's foreground).
    modalities : sequence of str
        Co-registered anatomicals written (``"T1w"``, ``"T2w"``).

    Returns
    -------
    dict key -> Path. Keys: ``dseg``, ``dseg_json``, ``mask``, ``mask_json``,
    ``probseg_<LABEL>`` and ``probseg_<LABEL>_json``, ``lesions``, ``volumes``,
    ``<modality>`` and ``<modality>_json``, ``report``. The dseg sidecar is written last
    and marks the FLAIR complete.
    """
    out_dir = Path(output_dir)
    specs = dict(OUTPUT_SPECS)
    for lab in probseg_labels:
        specs[f"probseg_{lab}"] = dict(space="orig", label=lab, suffix="probseg", extension=".nii.gz")
    for mod in modalities:
        specs[mod] = dict(space="orig", desc="coreg", suffix=mod, extension=".nii.gz")
    paths = {}
    for key, ent in specs.items():
        paths[key] = out_dir / _build(entities, PATH_PATTERN, **ent)
        if ent["extension"] == ".nii.gz":
            paths[f"{key}_json"] = out_dir / _build(entities, PATH_PATTERN, **dict(ent, extension=".json"))
    paths["report"] = out_dir / _build(entities, REPORT_PATTERN)
    return paths


def raw_uri(path: Path, bids_dir: Path | None) -> str:
    """``bids:raw:<path relative to the raw dataset>`` (BIDS URI, BIDS 1.9 "Sources"; ``raw``
    is in the dataset description's ``DatasetLinks``); the file name alone for a file
    outside ``bids_dir``. Symbolic links are not followed first (DataLad/git-annex datasets
    link each file into ``.git/annex``): the path is the one inside the dataset."""
    path = Path(path)
    if bids_dir is not None:
        for p, root in ((Path(os.path.abspath(path)), Path(os.path.abspath(bids_dir))),
                        (path.resolve(), Path(bids_dir).resolve())):
            try:
                return f"bids:raw:{p.relative_to(root).as_posix()}"
            except ValueError:
                pass
    return f"bids:raw:{path.name}"


def raw_path(uri: str, bids_dir: Path) -> Path:
    """The file a :func:`raw_uri` names, under ``bids_dir``.

    Raises
    ------
    ValueError
        If ``uri`` is not a ``bids:raw:`` URI.
    """
    prefix = "bids:raw:"
    if not isinstance(uri, str) or not uri.startswith(prefix) or len(uri) == len(prefix):
        raise ValueError(f"not a bids:raw: URI: {uri!r}")
    return Path(bids_dir) / uri[len(prefix):]


def output_prefix(entities: dict) -> str:
    """``sub-X[_ses-Y][_task-T][_acq-Z]...[_run-N][_echo-E][_part-P][_chunk-C]``
    (:data:`NAME_ENTITIES` in BIDS order): how one FLAIR is named in messages, logs and its
    report."""
    return _build(entities, REPORT_PATTERN)[: -len(".html")]


def crash_log_path(output_dir: Path, prefix: str, run_uuid: str) -> Path:
    """``logs/crash-<prefix>-<run>.txt``: the traceback of a failed FLAIR."""
    return Path(output_dir) / "logs" / f"{CRASH_PREFIX}{prefix}-{run_uuid}.txt"


def flair_lock_path(output_dir: Path, prefix: str) -> Path:
    """``logs/locks/<prefix>.lock``: the file a participant process locks while it processes a
    FLAIR (:func:`~ms3seg_app.participant.flair_lock`; the group level tests it)."""
    return Path(output_dir) / "logs" / "locks" / f"{prefix}.lock"


def used_card_path(output_dir: Path, card_sha256: str) -> Path:
    """``models/<sha256[:16]>_model_card.json``: the card a participant run used, kept with its outputs."""
    return Path(output_dir) / "models" / f"{card_sha256[:16]}_model_card.json"


def write_used_card(output_dir: Path, card) -> Path:
    """Copy a ModelCard's file into ``models/`` (atomic, only if absent: the name is its content hash)."""
    dest = used_card_path(output_dir, card.sha256)
    if card.path is not None and not dest.exists():
        atomic_write_bytes(dest, Path(card.path).read_bytes())
    return dest


def read_used_card(output_dir: Path, card_sha256: str) -> dict | None:
    """The card (JSON dict) a sidecar's ``ModelSHA256`` names, or None if it is not in ``models/``."""
    p = used_card_path(output_dir, card_sha256)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def prefix_from_crash_log(path: Path) -> str:
    """The FLAIR prefix a crash log names (inverse of :func:`crash_log_path`; run ids hold one ``-``)."""
    return Path(path).name[len(CRASH_PREFIX):].rsplit("-", 2)[0]


def resolve_crash_logs(output_dir: Path, prefix: str) -> list[Path]:
    """Move the crash logs of a FLAIR that has now succeeded into ``logs/resolved/``.

    ``logs/crash-*.txt`` then lists failures that still hold (the group level reports them),
    whatever the files' modification times (copies reset them); the tracebacks are kept.

    Parameters
    ----------
    output_dir : Path
    prefix : str
        The FLAIR's :func:`output_prefix`.

    Returns
    -------
    list of Path
        The crash logs' new paths.
    """
    logs = Path(output_dir) / "logs"
    moved = []
    for crash in sorted(logs.glob(f"{CRASH_PREFIX}{prefix}-*.txt")):
        if prefix_from_crash_log(crash) != prefix:  # sub-01 must not take sub-01_ses-02's logs
            continue
        dest = logs / "resolved" / crash.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(crash, dest)
        moved.append(dest)
    return moved


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


#: The dataset's class table (BIDS lookup table of the dseg label values), at the top level.
CLASS_TABLE = "desc-trimask_dseg.tsv"


def read_class_table(output_dir: Path) -> tuple:
    """The class table a participant run wrote (:data:`CLASS_TABLE`), as ClassInfo.

    Raises
    ------
    FileNotFoundError
        ``output_dir`` holds no class table (no participant run has written there).
    """
    import pandas as pd

    from .model.card import ClassInfo

    path = Path(output_dir) / CLASS_TABLE
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return tuple(ClassInfo(int(r["index"]), r["name"], r["abbreviation"], r["color"]) for _, r in df.iterrows())


def write_top_level(output_dir: Path, classes, bids_dir: Path | None = None, container: dict | None = None) -> None:
    """``dataset_description.json``, ``desc-trimask_dseg.tsv`` and ``.bidsignore``.

    Deterministic content, written atomically and only if different: safe for many
    concurrent participant jobs on one output folder.

    Parameters
    ----------
    output_dir : Path
    classes : sequence of ClassInfo
        The model card's class table (``desc-trimask_dseg.tsv``).
    bids_dir : Path, optional
        The raw dataset, named ``raw`` in ``DatasetLinks`` so that ``bids:raw:<path>``
        sources resolve (BIDS URIs).
    container : dict, optional
        ``GeneratedBy.Container``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    gen = {"Name": PIPELINE_NAME, "Version": __version__,
           "CodeURL": "https://github.com/ms3seg/ms3seg-app"}
    if container:
        gen["Container"] = container
    desc = {"Name": "ms3seg-app tri-mask segmentation", "BIDSVersion": "1.10.0",
            "DatasetType": "derivative", "GeneratedBy": [gen],
            **({"DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()}} if bids_dir else {}),
            "Authors": ["ms3seg-app developers"],
            "HowToAcknowledge": "Cite the MS3SEG dataset paper (Bashiri Bawil et al., Scientific Data 2025) "
                                "and ms3seg-app."}
    _write_if_changed(output_dir / "dataset_description.json", json.dumps(desc, indent=2, sort_keys=True) + "\n")
    lines = ["index\tname\tabbreviation\tcolor"]
    lines += [f"{c.index}\t{c.name}\t{c.abbreviation}\t{c.color}" for c in classes]
    _write_if_changed(output_dir / CLASS_TABLE, "\n".join(lines) + "\n")
    _write_if_changed(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    _write_if_changed(output_dir / "README", README_TEXT)


README_TEXT = """ms3seg-app derivatives: MS3SEG tri-mask segmentation of FLAIR MRI.

Per FLAIR (sub-<label>/[ses-<label>/]anat/): the tri-mask (desc-trimask_dseg; labels in
desc-trimask_dseg.tsv), per-class probability maps (label-<class>_probseg), the brain mask,
co-registered T1w/T2w, a lesion table and a volume table; all on the input FLAIR's voxel
grid (space-orig). One HTML report per FLAIR at the top level; group_* tables and
group.html from the group level; logs/ holds run logs and crash tracebacks.
"""

#: The sidecar fields copied into outputs (dseg sidecar ``AcquisitionMetadata``, report): the
#: acquisition parameters of the BIDS specification's MRI metadata (scanner hardware, sequence
#: specifics, in-plane encoding, timing, RF and contrast, slice acquisition) and dcm2niix's
#: common acquisition fields. A list of what may be copied, not of what may not: free text
#: (``ImageComments``, ``SeriesDescription``, ``ProtocolName``), UIDs, institution, station,
#: serial numbers, dates and times, and patient fields can identify a person or a site visit.
ACQUISITION_FIELDS = frozenset({
    "Manufacturer", "ManufacturersModelName", "SoftwareVersions", "MagneticFieldStrength", "ReceiveCoilName",
    "ReceiveCoilActiveElements", "GradientSetType", "MRTransmitCoilSequence", "MatrixCoilMode",
    "CoilCombinationMethod", "PulseSequenceType", "ScanningSequence", "SequenceVariant", "ScanOptions",
    "SequenceName", "PulseSequenceDetails", "NonlinearGradientCorrection", "MRAcquisitionType", "MTState",
    "SpoilingState", "SpoilingType", "NumberShots", "ParallelReductionFactorInPlane",
    "ParallelAcquisitionTechnique", "PartialFourier", "PartialFourierDirection", "PhaseEncodingDirection",
    "EffectiveEchoSpacing", "TotalReadoutTime", "EchoTime", "InversionTime", "SliceEncodingDirection",
    "DwellTime", "RepetitionTime", "FlipAngle", "NegativeContrast", "SliceThickness", "SpacingBetweenSlices",
    "Modality", "ImagingFrequency", "PixelBandwidth", "AcquisitionMatrixPE", "ReconMatrixPE", "BaseResolution",
    "PercentPhaseFOV", "PercentSampling", "PhaseEncodingSteps", "EchoTrainLength", "ImageType",
    "InPlanePhaseEncodingDirectionDICOM", "ConversionSoftware", "ConversionSoftwareVersion", "SAR",
    "BodyPartExamined", "PhaseResolution", "EchoNumber",
})


def safe_metadata(meta: dict) -> dict:
    """The acquisition parameters of a sidecar (:data:`ACQUISITION_FIELDS`), nothing else.

    Parameters
    ----------
    meta : dict or None
        The FLAIR's sidecar metadata (BIDS inheritance applied).

    Returns
    -------
    dict
        The fields of ``meta`` named in :data:`ACQUISITION_FIELDS`, values as read.
    """
    return {k: v for k, v in (meta or {}).items() if k in ACQUISITION_FIELDS}
