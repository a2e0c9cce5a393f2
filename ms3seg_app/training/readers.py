"""Readers for the labelled MRI layouts we train on, and duplicate-image detection.

Three layouts (see ``shared/data/README.md`` of the development workspace):

``ms3seg_sample``
    ``MS_100_patient_registered/<id>/<id>_FLAIR.nii.gz`` with
    ``MS_100_patient_masks/{Vent_Masks,abWMH_Masks}/<id>/<id>_*_Mask.nii.gz``.
    Ventricles and abnormal WMH annotated; normal WMH is *not* (labelled background).
``trimask_sample``
    ``subjects_flair/<id>_*.nii.gz`` with ``{vent,nWMH,abWMH}_manual_segmentations/<id>.nii.gz``;
    all four tri-mask classes annotated.
``normal_wmh_png``
    ``<id>_<k>.png``, 16-bit 256x512: FLAIR slice | mask (0, ~32639 normal WMH,
    65535 abnormal WMH). Ventricles not annotated.

The mask headers of ``ms3seg_sample`` disagree with the FLAIR's (different orientation
codes). Most masks align by voxel index, some by header: :func:`align_mask` tries both
and keeps the one whose FLAIR contrast fits (ventricles dark, lesions bright). Masks are thresholded (float masks hold ~1.00000006,
some uint8 masks hold stray 255 values).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..exceptions import InputDataError

LOGGER = logging.getLogger("ms3seg.training")

#: annotated flags, index = tri-mask class (background is always "annotated").
ALL_ANNOTATED = (True, True, True, True)
NO_NWMH = (True, True, False, True)
NO_VENTRICLES = (True, False, True, True)


@dataclass
class LabelledVolume:
    """A FLAIR volume with a tri-mask label volume on its voxel grid.

    Attributes
    ----------
    subject : str
        Patient identifier.
    source : str
        Layout it came from.
    flair : nibabel.Nifti1Image
        3D FLAIR, stored order; its affine is the geometry of the labels too.
    labels : ndarray (I, J, K) uint8
        Tri-mask labels 0-3, same shape and voxel order as ``flair``.
    annotated : tuple of 4 bool
        Which classes were annotated; an unannotated class is labelled 0.
    flair_path : Path
    """

    subject: str
    source: str
    flair: nib.Nifti1Image
    labels: np.ndarray
    annotated: tuple
    flair_path: Path
    extra: dict = field(default_factory=dict)


@dataclass
class LabelledSlice:
    """A 2D FLAIR slice with tri-mask labels (no 3D geometry known).

    Attributes
    ----------
    image : ndarray (H, W) float32
    labels : ndarray (H, W) uint8
    annotated : tuple of 4 bool
    subject : str
    name : str
    """

    image: np.ndarray
    labels: np.ndarray
    annotated: tuple
    subject: str
    name: str


def image_content_hash(path: Path | str) -> str:
    """sha256 of an image's decoded voxel array, shape and dtype.

    Two files with identical image content (whatever their header or compression)
    get the same hash; used to flag the same scan filed under two subjects.
    """
    img = nib.load(str(path))
    arr = np.ascontiguousarray(np.asanyarray(img.dataobj))
    h = hashlib.sha256()
    h.update(str(arr.shape).encode())
    h.update(str(arr.dtype).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def find_duplicate_images(paths: dict[str, Path]) -> list[list[str]]:
    """Groups of keys whose images have identical voxel content.

    Parameters
    ----------
    paths : dict key -> path of a NIfTI image

    Returns
    -------
    list of lists of keys (each of length >= 2), sorted.
    """
    by_hash: dict[str, list[str]] = {}
    for key, path in sorted(paths.items()):
        by_hash.setdefault(image_content_hash(path), []).append(key)
    return sorted(sorted(keys) for keys in by_hash.values() if len(keys) > 1)


def _binary(path: Path, shape: tuple) -> np.ndarray:
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    if arr.shape != shape:
        raise InputDataError(f"{path}: mask shape {arr.shape} differs from the FLAIR's {shape}")
    # > 0.5 for float masks of 0 and ~1; uint8 masks with stray 255 values are > 0.5 too.
    return np.asarray(arr, dtype=np.float64) > 0.5


_RING = np.zeros((3, 3, 1), bool)
_RING[:, :, 0] = True


def contrast_ratio(flair: np.ndarray, mask: np.ndarray, ring_voxels: int = 3) -> float:
    """Mean FLAIR inside a mask / mean FLAIR in an in-plane ring around it.

    A ventricle mask that fits its FLAIR is much darker than the tissue around it
    (ratio ~0.3-0.45 on the development data); a lesion mask that fits is brighter
    (~1.3-1.5). A misplaced mask scores near 1.

    Parameters
    ----------
    flair : ndarray (I, J, K)
    mask : ndarray (I, J, K) bool
    ring_voxels : int
        In-plane ring width (dilation iterations).

    Returns
    -------
    float; NaN for an empty mask.
    """
    from scipy import ndimage

    if not mask.any():
        return float("nan")
    f = np.asarray(flair, dtype=np.float64)
    ring = ndimage.binary_dilation(mask, _RING, iterations=ring_voxels) & ~mask
    return float(f[mask].mean() / max(f[ring].mean(), 1e-6))


def mask_fit_score(flair: np.ndarray, ventricles: np.ndarray) -> float:
    """Ventricle-mask fit: :func:`contrast_ratio` (lower is better; ``inf`` if empty)."""
    r = contrast_ratio(flair, ventricles)
    return float("inf") if r != r else r


def align_mask(mask_path: Path, flair_img: nib.Nifti1Image, flair_data: np.ndarray, dark: bool) -> tuple:
    """Put a mask on its FLAIR's voxel grid, by voxel index or by header, whichever fits.

    The development masks' headers disagree with the FLAIRs' (e.g. FLAIR LAS, mask
    RAS). For most subjects voxel [i,j,k] of the mask labels voxel [i,j,k] of the
    FLAIR; for some it is mirrored left-right, and the header does not always say so.
    The candidates (index, header, and the in-plane mirrors of the index alignment) are
    scored with :func:`contrast_ratio` (ventricles must be dark, ``dark=True``; lesions
    bright) and the best one is kept; the index alignment wins ties.

    Returns
    -------
    (mask ndarray (I, J, K) bool, str name of the alignment used, float contrast ratio)
    """
    img = nib.load(str(mask_path))
    by_index = _binary(mask_path, flair_img.shape)
    cands = {"index": by_index}
    trans = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                            nib.orientations.io_orientation(flair_img.affine))
    by_header = nib.orientations.apply_orientation(by_index, trans)
    if by_header.shape == by_index.shape:
        cands["header"] = by_header
    # In-plane mirrors: some development masks are stored left-right mirrored with a
    # header that does not say so (found by the contrast test, see the docstring).
    cands["mirror_i"] = by_index[::-1]
    cands["mirror_j"] = by_index[:, ::-1]
    cands["mirror_ij"] = by_index[::-1, ::-1]
    scores = {k: contrast_ratio(flair_data, m) for k, m in cands.items()}
    sign = 1.0 if dark else -1.0
    key = min(scores, key=lambda k: (sign * scores[k] if scores[k] == scores[k] else 9.0) - (1e-3 if k == "index" else 0))
    return cands[key], key, scores[key]


def read_ms3seg_sample(root: Path | str) -> list[LabelledVolume]:
    """Read the ``ms3seg_sample`` layout; drop duplicated scans whose masks do not fit.

    A scan whose FLAIR content is identical to another subject's is a filing error.
    Of each group of identical scans, the subject whose ventricle mask fits the image
    best is kept (if it fits at all: contrast < 0.6); the others are excluded with a
    warning. This identifies a corrupt subject by content, never by its id.

    Parameters
    ----------
    root : path
        Folder holding ``MS_100_patient_registered`` and ``MS_100_patient_masks``.

    Returns
    -------
    list of LabelledVolume, sorted by subject; ``labels`` hold 0, 1 (ventricles), 3 (lesions).

    Raises
    ------
    InputDataError
        If the folder layout is missing.
    """
    root = Path(root)
    reg = root / "MS_100_patient_registered"
    masks = root / "MS_100_patient_masks"
    if not reg.is_dir() or not masks.is_dir():
        raise InputDataError(f"{root}: expected MS_100_patient_registered/ and MS_100_patient_masks/")
    flairs = {}
    for d in sorted(p for p in reg.iterdir() if p.is_dir()):
        f = d / f"{d.name}_FLAIR.nii.gz"
        if f.exists():
            flairs[d.name] = f
    volumes = {}
    for sid, fpath in flairs.items():
        img = nib.load(str(fpath))
        shape = img.shape
        vent_p = masks / "Vent_Masks" / sid / f"{sid}_Vent_Mask.nii.gz"
        les_p = masks / "abWMH_Masks" / sid / f"{sid}_abWMH_Mask.nii.gz"
        if not vent_p.exists() or not les_p.exists():
            LOGGER.warning("%s: masks missing, subject skipped", sid)
            continue
        fdata = np.asanyarray(img.dataobj)
        vent, vhow, vfit = align_mask(vent_p, img, fdata, dark=True)
        les, lhow, lfit = align_mask(les_p, img, fdata, dark=False)
        LOGGER.info("%s: ventricle mask aligned by %s (contrast %.2f), lesion mask by %s (%.2f)",
                    sid, vhow, vfit, lhow, lfit)
        labels = np.zeros(shape, np.uint8)
        labels[vent] = 1
        labels[les] = 3  # lesions win where the two masks overlap (rare, at the wall)
        volumes[sid] = LabelledVolume(sid, "ms3seg_sample", img, labels, NO_NWMH, fpath,
                                      extra={"brain_mask": reg / sid / f"{sid}_brain_mask.nii.gz",
                                             "alignment": {"ventricles": vhow, "lesions": lhow},
                                             "contrast": {"ventricles": vfit, "lesions": lfit}})
    excluded = set()
    for group in find_duplicate_images(flairs):
        scores = {}
        for sid in group:
            if sid in volumes:
                v = volumes[sid]
                scores[sid] = mask_fit_score(np.asanyarray(v.flair.dataobj), v.labels == 1)
        keep = min(scores, key=scores.get) if scores else None
        if keep is not None and scores[keep] >= 0.6:
            keep = None
        for sid in group:
            if sid != keep:
                excluded.add(sid)
        LOGGER.warning(
            "identical FLAIR content under subjects %s (ventricle-mask fit %s); keeping %s, excluding %s",
            group, {k: round(s, 3) for k, s in scores.items()}, keep, sorted(set(group) - {keep}),
        )
    return [v for sid, v in sorted(volumes.items()) if sid not in excluded]


def read_trimask_sample(root: Path | str) -> list[LabelledVolume]:
    """Read the ``trimask_sample`` layout (all four classes annotated).

    Parameters
    ----------
    root : path
        Folder holding ``subjects_flair`` and ``{vent,nWMH,abWMH}_manual_segmentations``.

    Returns
    -------
    list of LabelledVolume, labels 0-3.
    """
    root = Path(root)
    fdir = root / "subjects_flair"
    if not fdir.is_dir():
        raise InputDataError(f"{root}: expected subjects_flair/")
    out = []
    for fpath in sorted(fdir.glob("*.nii.gz")):
        sid = fpath.name.split("_")[0]
        img = nib.load(str(fpath))
        shape = img.shape
        paths = {c: root / f"{d}_manual_segmentations" / f"{sid}.nii.gz"
                 for c, d in ((1, "vent"), (2, "nWMH"), (3, "abWMH"))}
        if not all(p.exists() for p in paths.values()):
            LOGGER.warning("%s: a manual segmentation is missing, subject skipped", sid)
            continue
        labels = np.zeros(shape, np.uint8)
        for c in (1, 2, 3):
            labels[_binary(paths[c], shape)] = c
        out.append(LabelledVolume(sid, "trimask_sample", img, labels, ALL_ANNOTATED, fpath))
    return out


def read_normal_wmh_png(root: Path | str) -> list[LabelledSlice]:
    """Read the 2D ``normal_wmh_png`` slices (normal + abnormal WMH annotated, ventricles not).

    The mask half is anti-aliased: values are rounded to the nearest of 0, 32639.5
    and 65535 (classes background, normal WMH, abnormal WMH).

    The PNGs are displayed radiologically (rows anterior->posterior, columns
    right->left of the patient); they are turned into the model's slice orientation
    (rows along +x, columns along +y).

    Returns
    -------
    list of LabelledSlice, image float32 (256, 256) in arbitrary units, labels uint8.
    """
    from PIL import Image

    root = Path(root)
    out = []
    pat = re.compile(r"^(?P<sid>[^_]+)_(?P<k>\d+)\.png$")
    files = sorted(root.glob("*.png"), key=lambda p: (p.name.split("_")[0], int(pat.match(p.name)["k"]) if pat.match(p.name) else 0))
    for p in files:
        m = pat.match(p.name)
        if not m:
            continue
        arr = np.asarray(Image.open(p)).astype(np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 * arr.shape[0]:
            raise InputDataError(f"{p}: expected a grey H x 2H image (FLAIR | mask)")
        h = arr.shape[0]
        img, msk = arr[:, :h], arr[:, h:]
        cls = np.rint(msk / 32639.5).clip(0, 2).astype(np.uint8)
        labels = np.zeros_like(cls)
        labels[cls == 1] = 2
        labels[cls == 2] = 3
        out.append(LabelledSlice(_display_to_model(img).astype(np.float32), _display_to_model(labels),
                                 NO_VENTRICLES, m["sid"], p.stem))
    return out


def _display_to_model(a: np.ndarray) -> np.ndarray:
    """Radiological display (rows A->P, cols R->L) -> model slice (rows +x, cols +y).

    Row index r (anterior first) maps to y = H-1-r; column c (patient right first)
    maps to x = W-1-c... in RAS +x is Right, so column c increasing goes towards
    Left, i.e. x index = W-1-c.
    """
    return np.ascontiguousarray(np.flip(a, axis=(0, 1)).T)


#: Lesion-only annotation (external sets): ventricles and normal WMH unknown.
LESION_ONLY = (True, False, False, True)
#: Assumed pixel size (mm) of the Mendeley slices, resized to 512x512 from ~240 px
#: acquisitions without keeping their spacing (external_2d/README.md): ~0.47 mm.
MENDELEY_PIXEL_MM = 0.47


@dataclass
class SourcedSlice(LabelledSlice):
    """A :class:`LabelledSlice` with the site/dataset it came from (leave-one-source-out)."""

    source: str = ""


def read_mssegsam_coco(root: Path | str) -> list[SourcedSlice]:
    """Read the ``external_2d/mssegsam_coco`` slices (1 mm MNI, skull-stripped, lesions only).

    Polygons of the COCO file are rasterised with PIL (pixel centres inside the
    polygon). The JPEG is the MNI slice transposed with anterior on the left
    (external_2d/README.md): columns are flipped so that they run along +y
    (anterior) as the model's slices do; rows are MNI x (left-right is randomised
    by the training flip, so its sign does not matter).

    Parameters
    ----------
    root : path
        Folder holding ``annotations.json`` and ``images/``.

    Returns
    -------
    list of SourcedSlice; ``image`` float32 (182, 218), ``labels`` uint8 {0, 3},
    ``subject`` and ``source`` = the file-name prefix (``MSLesSeg`` or ``PubMRI``).

    Raises
    ------
    InputDataError
        If ``annotations.json`` is missing or not COCO.
    """
    import json

    from PIL import Image, ImageDraw

    root = Path(root)
    ann_p = root / "annotations.json"
    if not ann_p.is_file():
        raise InputDataError(f"{root}: annotations.json missing (COCO lesion polygons expected)")
    coco = json.loads(ann_p.read_text())
    polys: dict[int, list] = {}
    for a in coco["annotations"]:
        polys.setdefault(a["image_id"], []).extend(a["segmentation"])
    out = []
    for im in sorted(coco["images"], key=lambda r: r["file_name"]):
        p = root / "images" / im["file_name"]
        if not p.is_file():
            continue
        img = np.asarray(Image.open(p).convert("L"), np.float32)
        mask = Image.new("L", (im["width"], im["height"]), 0)
        draw = ImageDraw.Draw(mask)
        for poly in polys.get(im["id"], []):
            if len(poly) >= 6:
                draw.polygon([(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])], fill=1)
        lab = (np.asarray(mask) > 0).astype(np.uint8) * 3
        src = im["file_name"].split("_")[0]
        out.append(SourcedSlice(np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(lab[:, ::-1]),
                                LESION_ONLY, src, p.stem, src))
    return out


def read_mendeley_jpg(root: Path | str, pixel_mm: float = MENDELEY_PIXEL_MM) -> list[SourcedSlice]:
    """Read the ``external_2d/mendeley_jpg`` slices (whole head, 512x512, lesions only).

    Images are resampled from the assumed ``pixel_mm`` to 1 mm (linear; masks
    thresholded at 127 then nearest) and turned from radiological display into the
    model's slice orientation. The raters labelled periventricular caps as lesion,
    and file names carry no patient id: the set is used for validation only.

    Returns
    -------
    list of SourcedSlice, ``source`` = ``"Mendeley"``, ``subject`` = ``"Mendeley"``.
    """
    from PIL import Image

    root = Path(root)
    out = []
    for p in sorted((root / "images").glob("*.jpg")):
        mp = root / "masks" / p.name
        if not mp.is_file():
            continue
        img = np.asarray(Image.open(p).convert("L"), np.float32)
        msk = (np.asarray(Image.open(mp).convert("L")) > 127).astype(np.uint8) * 3
        zoom = pixel_mm / 1.0
        img = ndimage.zoom(img, zoom, order=1)
        msk = ndimage.zoom(msk, zoom, order=0)
        out.append(SourcedSlice(_display_to_model(img).astype(np.float32), _display_to_model(msk),
                                LESION_ONLY, "Mendeley", p.stem, "Mendeley"))
    return out
