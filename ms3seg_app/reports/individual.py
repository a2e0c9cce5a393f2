"""Participant HTML report: one self-contained file a reviewer can check the numbers with.

Contents, top to bottom: QC warnings; headline (axial mosaic with the tri-mask and
lesion ids, key figures in mL and % of ICV, lesion count by location); the checks the
numbers rest on (brain-mask contour over the FLAIR, FLAIR edges over each co-registered
image, every slice with lesions); an interactive viewer (NiiVue, vendored under
``data/vendor/niivue`` and inlined; FLAIR and tri-mask embedded as base64 NIfTI); the
lesion table; a Methods paragraph generated from the provenance; acquisition metadata.

No request leaves the file: figures are PNG ``data:`` URIs, scripts are inline and
allowed by sha256 hash sources in a strict Content-Security-Policy (no
``'unsafe-inline'`` for scripts). Every text from the dataset is autoescaped by jinja2.
Images are shown in radiological convention (patient right on the image left) with
explicit R/L markers.
"""
from __future__ import annotations

import base64
import gzip
import logging
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .. import LABELS, LESION_CLASS, __version__
from ..derivatives import atomic_write_text
from ..model.card import class_index
from . import CSP_SCRIPT_PLACEHOLDER, class_colors, class_infos, env, finalize_csp, format_value, png_base64

LOGGER = logging.getLogger("ms3seg.reports")
NIIVUE_VERSION = "0.69.0"
#: the FLAIR embedded in the viewer is subsampled (integer stride) above this many voxels
VIEWER_MAX_VOXELS = 2 ** 24
LESION_COLUMNS = {
    "lesion_id": "Lesion",
    "slice": "Axial slice",
    "n_voxels": "Voxels",
    "volume_mm3": "Volume (mm³)",
    "location": "Location",
    "dist_ventricles_mm": "Distance to ventricles (mm)",
    "dist_brain_surface_mm": "Distance to brain surface (mm)",
    "mean_probability": "Mean probability",
    "uncertainty": "Uncertainty",
    "centroid_x_mm": "Centroid x (mm)",
    "centroid_y_mm": "Centroid y (mm)",
    "centroid_z_mm": "Centroid z (mm)",
}
LOCATIONS = ("periventricular", "juxtacortical", "deep")
REFERENCES = {
    "ms3seg": "Bashiri Bawil M, et al. MS3SEG: a multiple sclerosis MRI dataset with tri-mask annotations "
              "of lesions, normal white-matter hyperintensities and ventricles. Scientific Data, 2025.",
    "deepbet": "Fisch L, et al. deepbet: fast brain extraction of T1-weighted MRI using convolutional "
               "neural networks. Computers in Biology and Medicine, 179:108845, 2024.",
    "bet": "Smith SM. Fast robust automated brain extraction. Human Brain Mapping, 17(3):143-155, 2002.",
    "ants": "Avants BB, Tustison NJ, Song G, Cook PA, Klein A, Gee JC. A reproducible evaluation of ANTs "
            "similarity metric performance in brain image registration. NeuroImage, 54(3):2033-2044, 2011.",
    "n4": "Tustison NJ, et al. N4ITK: improved N3 bias correction. IEEE Transactions on Medical Imaging, "
          "29(6):1310-1320, 2010.",
    "nipype": "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging data "
              "processing framework in Python. Frontiers in Neuroinformatics, 5:13, 2011.",
    "pybids": "Yarkoni T, et al. PyBIDS: Python tools for BIDS datasets. Journal of Open Source Software, "
              "4(40):1294, 2019.",
    "tensorflow": "Abadi M, et al. TensorFlow: large-scale machine learning on heterogeneous systems, 2015. "
                  "Software available from tensorflow.org; Chollet F, et al. Keras, 2015.",
    "niivue": "NiiVue (BSD-2-Clause), https://github.com/niivue/niivue, used for the interactive viewer.",
}


# --------------------------------------------------------------------------- geometry


def _reorient(flair: nib.Nifti1Image, *arrays: np.ndarray):
    """FLAIR and arrays on its grid reoriented to the closest RAS+ voxel order.

    Returns
    -------
    (canonical FLAIR image, list of reoriented arrays)
    """
    ornt = nib.orientations.io_orientation(flair.affine)
    can = flair.as_reoriented(ornt)
    out = []
    for a in arrays:
        a = np.asanyarray(a)
        if a.shape[:3] != flair.shape[:3]:
            raise ValueError(f"array of shape {a.shape} is not on the FLAIR grid {flair.shape}")
        out.append(nib.orientations.apply_orientation(a, ornt))
    return can, out


def _disp(sl: np.ndarray) -> np.ndarray:
    """RAS+ axial slice (i: left->right, j: posterior->anterior) -> radiological display.

    Row 0 is anterior, column 0 is the patient's right: ``out[r, c] = sl[I-1-c, J-1-r]``.
    """
    return sl[::-1, ::-1].T


def _window(data: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """Display window: 0.5th-99.5th percentile of the intensities in the brain mask (or > 0)."""
    sel = data[mask] if mask is not None and mask.any() else data[data > 0]
    if sel.size == 0:
        sel = data.ravel()
    if sel.size > 400_000:
        sel = sel[:: sel.size // 200_000]
    lo, hi = np.percentile(sel, [0.5, 99.5]).astype(float)
    lo = min(lo, 0.0) if lo >= 0 else lo
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _even(ks: list[int], n: int) -> list[int]:
    if len(ks) <= n:
        return list(ks)
    return [ks[int(round(i))] for i in np.linspace(0, len(ks) - 1, n)]


# --------------------------------------------------------------------------- figures

def class_table(classes=None) -> list[dict]:
    """The classes to draw: ``index``, ``name``, ``abbr``, ``color`` (``#rrggbb``) per class.

    Parameters
    ----------
    classes : sequence of :class:`~ms3seg_app.model.card.ClassInfo`, optional
        The class table of the model card that made the segmentation (names, label values
        and colours come from it); default: the MS3SEG tri-mask (``ms3seg_app.CLASSES``).
    """
    return [{"index": int(c.index), "name": c.name, "abbr": c.abbreviation, "color": c.color}
            for c in class_infos(classes)]


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)], float) / 255


#: Resolution of the report's PNG figures (dots per inch of their ``tile_in``-inch tiles).
MOSAIC_DPI = 80


def _shrink(a: np.ndarray, f: int, how: str) -> np.ndarray:
    """2D array reduced over ``f`` x ``f`` blocks (edge-padded to a multiple of ``f``):
    ``"mean"`` (float32), ``"max"`` or ``"any"``.

    Written here rather than taken from scikit-image's ``block_reduce``: a reshape and one
    reduction, and scikit-image is not a dependency.
    """
    if f == 1:
        return a
    h, w = a.shape
    a = np.pad(a, ((0, -h % f), (0, -w % f)), mode="edge")
    blocks = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f)
    if how == "mean":
        return blocks.mean(axis=(1, 3), dtype=np.float32)
    return blocks.max(axis=(1, 3)) if how == "max" else blocks.any(axis=(1, 3))


def _shrink_factor(ni: int, aspect: float, tile_in: float) -> int:
    """Largest integer factor that keeps at least one voxel per displayed pixel in a tile.

    A tile is drawn ``tile_in`` x :data:`MOSAIC_DPI` px wide for its ``ni`` columns, each of
    its rows ``aspect`` (row / column voxel size) times a column's width high.
    """
    return max(1, int(ni // (tile_in * MOSAIC_DPI * max(1.0, aspect))))


def _mosaic(ks: list[int], base: np.ndarray, zooms, lo: float, hi: float, *, ncols: int = 4,
            labels: np.ndarray | None = None, alpha: float = 0.45, contour: np.ndarray | None = None,
            edges: np.ndarray | None = None, marks: dict | None = None, tile_in: float = 2.6,
            classes: list | None = None, lesion_label: int | None = None) -> str:
    """One PNG (base64) of axial slices ``ks`` of RAS+ arrays, radiological display.

    Parameters
    ----------
    ks : list of int
        Axial slice indices (third RAS+ axis, inferior to superior).
    base : ndarray, (I, J, K) float
        Grey background, windowed to [lo, hi].
    zooms : sequence of float
        Voxel size (mm) along I, J (sets the pixel aspect).
    labels : ndarray, (I, J, K) uint8, optional
        Segmentation, blended with ``alpha`` in the colours of ``classes``.
    contour : ndarray, (I, J, K) bool, optional
        Drawn as a yellow outline (brain mask).
    edges : ndarray, (I, J, K) bool, optional
        Painted magenta (edges of another image).
    marks : dict, optional
        slice index -> list of (i, j, text) RAS+ voxel positions of lesion ids.
    classes : list of dict, optional
        :func:`class_table` (default: the MS3SEG tri-mask).
    lesion_label : int, optional
        Label value of the lesion class: where tiles are shrunk (below), a block holding
        any of it shows it, so a one-voxel lesion stays visible; other blocks show their
        highest label.

    Tiles of at least twice as many voxels as displayed pixels along both axes (the width is
    ``tile_in`` x :data:`MOSAIC_DPI` px, e.g. a 512x512 slice in a 208-px tile) are shrunk
    by the integer factor that keeps at least one voxel per pixel (block mean of the grey
    values, block maximum of the labels with the lesion class first, any of the edges,
    block mean of the contour mask): the PNG keeps its size and shows what a 256x256
    slice's would (at class borders a block takes the higher label); matplotlib's float
    copies of the mosaic are 4x smaller.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt

    ni, nj = base.shape[:2]
    aspect = float(zooms[1]) / float(zooms[0])
    f = _shrink_factor(ni, aspect, tile_in)

    def disp(sl: np.ndarray, how: str) -> np.ndarray:
        return _shrink(_disp(sl), f, how)

    h, w, gap = -(-nj // f), -(-ni // f), 2
    ncols = max(1, min(ncols, len(ks)))
    nrows = int(np.ceil(len(ks) / ncols))
    # composited in 8 bits (the PNG's depth): a float64 mosaic of a 512x512 scan's 12 tiles took
    # 76 MB and matplotlib's float copies of it several times that
    rgb = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap, 3), 38, np.uint8)
    tiled_contour = np.zeros(rgb.shape[:2], np.float32) if contour is not None else None
    for n, k in enumerate(ks):
        r0, c0 = (n // ncols) * (h + gap), (n % ncols) * (w + gap)
        g = np.clip((disp(base[:, :, k].astype(np.float32, copy=False), "mean") - lo) / (hi - lo), 0, 1)
        tile = np.repeat(g[..., None], 3, axis=2)
        if labels is not None:
            lb = disp(labels[:, :, k], "max")
            if f > 1 and lesion_label is not None:
                lb[disp(labels[:, :, k] == lesion_label, "any")] = lesion_label
            for c in class_table() if classes is None else classes:
                if c["index"]:
                    m = lb == c["index"]
                    tile[m] = (1 - alpha) * tile[m] + alpha * _rgb(c["color"])
        if edges is not None:
            tile[disp(edges[:, :, k], "any")] = (1.0, 0.2, 1.0)
        rgb[r0:r0 + h, c0:c0 + w] = np.rint(tile * 255)
        if tiled_contour is not None:
            tiled_contour[r0:r0 + h, c0:c0 + w] = disp(contour[:, :, k].astype(np.float32), "mean")
    width = ncols * tile_in
    height = width * rgb.shape[0] * aspect / rgb.shape[1]
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, aspect=aspect, interpolation="antialiased")
    if tiled_contour is not None and tiled_contour.any():
        ax.contour(tiled_contour, levels=[0.5], colors="#ffd400", linewidths=1.0)
    stroke = [pe.withStroke(linewidth=2.5, foreground="black")]
    for n, k in enumerate(ks):
        r0, c0 = (n // ncols) * (h + gap), (n % ncols) * (w + gap)
        kw = dict(color="white", fontsize=11, fontweight="bold", path_effects=[pe.withStroke(linewidth=2,
                                                                                          foreground="black")])
        ax.text(c0 + 2, r0 + h / 2, "R", ha="left", va="center", **kw)
        ax.text(c0 + w - 3, r0 + h / 2, "L", ha="right", va="center", **kw)
        ax.text(c0 + 2, r0 + 2, f"slice {k}", ha="left", va="top", color="#ffe680", fontsize=8,
                path_effects=stroke)
        for i, j, text in (marks or {}).get(k, []):
            # the voxel's position in its f x f block, in block units (a block's pixel is its centre)
            x, y = c0 + ((ni - 1 - i) - (f - 1) / 2) / f, r0 + ((nj - 1 - j) - (f - 1) / 2) / f
            ax.annotate(text, (x, y), xytext=(9, 9), textcoords="offset points", color="black",
                        fontsize=9, fontweight="bold", ha="left", va="bottom",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="black", lw=0.6, alpha=0.9),
                        arrowprops=dict(arrowstyle="-", color="white", lw=1.0))
    ax.set_xlim(-0.5, rgb.shape[1] - 0.5)
    ax.set_ylim(rgb.shape[0] - 0.5, -0.5)
    ax.axis("off")
    return png_base64(fig, dpi=MOSAIC_DPI)


def _edges(img: np.ndarray, mask: np.ndarray, frac: float = 0.06) -> np.ndarray:
    """Strongest in-plane gradients (Sobel magnitude, top ``frac`` within the head) of a volume."""
    from scipy import ndimage

    f = img.astype(np.float32)
    mag = np.hypot(ndimage.sobel(f, axis=0), ndimage.sobel(f, axis=1))
    sel = mag[mask] if mask.any() else mag.ravel()
    thr = np.quantile(sel[:: max(1, sel.size // 200_000)], 1 - frac) if sel.size else np.inf
    return mag > max(thr, 1e-6)


# --------------------------------------------------------------------------- viewer


def _nifti_b64(data: np.ndarray, affine: np.ndarray, slope: float = 1.0) -> str:
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)).decode("ascii")


def viewer_data(can_flair: np.ndarray, can_dseg: np.ndarray, affine: np.ndarray, lo: float, hi: float,
                max_voxels: int = VIEWER_MAX_VOXELS) -> dict:
    """The FLAIR and the tri-mask as base64 gzipped NIfTI for the embedded viewer.

    The FLAIR is quantised to uint8 over [0, 1.25 * hi] (the NIfTI slope restores the
    intensity scale) and, above ``max_voxels``, subsampled by an integer stride; labels
    are subsampled the same way (nearest neighbour).

    Parameters
    ----------
    can_flair, can_dseg : ndarray, (I, J, K)
        RAS+ FLAIR (float) and tri-mask (uint8).
    affine : ndarray, (4, 4)
        Voxel to scanner RAS+ mm of the RAS+ arrays.

    Returns
    -------
    dict: flair, dseg (base64 str), shape (list of int), stride (int), window (lo, hi),
    max (float), n_bytes (int, both payloads).
    """
    stride = 1
    while np.prod([int(np.ceil(s / stride)) for s in can_flair.shape[:3]]) > max_voxels:
        stride += 1
    sl = (slice(None, None, stride),) * 3
    f = can_flair[sl]
    d = np.ascontiguousarray(can_dseg[sl], dtype=np.uint8)
    aff = affine @ np.diag([stride, stride, stride, 1.0])
    top = 1.25 * hi if hi > 0 else 1.0
    q = np.clip(np.rint(np.asarray(f, np.float32) / top * 255), 0, 255).astype(np.uint8)
    fb, db = _nifti_b64(q, aff, top / 255), _nifti_b64(d, aff)
    return {"flair": fb, "dseg": db, "shape": [int(s) for s in d.shape], "stride": stride,
            "window": [round(max(lo, 0.0), 3), round(hi, 3)], "max": round(float(top), 3),
            "n_bytes": len(fb) + len(db)}


@lru_cache(maxsize=1)
def niivue_js() -> str:
    """The vendored NiiVue UMD bundle (defines the global ``niivue``)."""
    js = resources.files("ms3seg_app").joinpath("data/vendor/niivue/niivue.umd.js").read_text("utf-8")
    if "</script" in js.lower():  # would end the inline element early
        js = js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return js


# --------------------------------------------------------------------------- text


def _fmt(v, nd: int = 3) -> str:
    return format_value(v, nd)


def key_figures(volumes: dict, classes=None) -> dict:
    """Headline rows: class volumes (mL, % ICV) and lesions by location (n, mL, % of lesion volume).

    ``classes``: ClassInfo of the card (colours by abbreviation, :func:`~ms3seg_app.reports.class_colors`).
    """
    color = class_colors(classes)

    def pct(x):
        return _fmt(100 * float(x), 3) if x is not None and np.isfinite(float(x)) else "n/a"

    classes = [
        {"name": "Abnormal WMH (MS lesions)", "abbr": "AWMH", "color": color["AWMH"],
         "ml": _fmt(volumes.get("abnormal_wmh_ml")), "icv": pct(volumes.get("abnormal_wmh_icv_fraction", np.nan))},
        {"name": "Normal WMH", "abbr": "NWMH", "color": color["NWMH"],
         "ml": _fmt(volumes.get("normal_wmh_ml")), "icv": pct(volumes.get("normal_wmh_icv_fraction", np.nan))},
        {"name": "Ventricles", "abbr": "VEN", "color": color["VEN"],
         "ml": _fmt(volumes.get("ventricles_ml")), "icv": pct(volumes.get("ventricles_icv_fraction", np.nan))},
    ]
    locs = [{"name": loc.capitalize(), "count": _fmt(volumes.get(f"lesion_{loc}_count")),
             "ml": _fmt(volumes.get(f"lesion_{loc}_ml")),
             "share": pct(volumes.get(f"lesion_{loc}_share", np.nan))} for loc in LOCATIONS]
    return {"classes": classes, "locations": locs, "icv": _fmt(volumes.get("icv_ml"), 4),
            "lesion_count": _fmt(volumes.get("lesion_count"))}


def methods_text(provenance: dict) -> dict:
    """A Methods paragraph (plain text, to paste into a paper) and its references from ``provenance``.

    Returns
    -------
    dict: paragraphs (list of str), references (list of str, numbered in citation order).
    """
    p = provenance or {}
    sw = {str(k).lower(): (k, v) for k, v in (p.get("software") or {}).items()}
    refs: list[str] = []

    def cite(key):
        if REFERENCES[key] not in refs:
            refs.append(REFERENCES[key])
        return f"[{refs.index(REFERENCES[key]) + 1}]"

    def ver(name):
        return f" {sw[name][1]}" if name in sw else ""

    paras = []
    paras.append(
        f"White-matter hyperintensities and ventricles were segmented with ms3seg-app "
        f"{p.get('ms3seg_app_version', __version__)}, which labels every FLAIR voxel as background, "
        f"ventricles, normal white-matter hyperintensity (WMH) or abnormal WMH (MS lesion) following the "
        f"MS3SEG tri-mask definition {cite('ms3seg')}. Input data were queried with PyBIDS{ver('pybids')} "
        f"{cite('pybids')} and the processing steps were run as a Nipype{ver('nipype')} workflow "
        f"{cite('nipype')}.")
    steps = []
    ss = str(p.get("skull_stripping", "none")).lower()
    if ss in ("deepbet", "deep-bet"):
        steps.append(f"the brain was extracted with deepbet 1.0.2's networks (ported to Keras, weights bundled) "
                     f"{cite('deepbet')}")
    elif ss in ("fsl-bet", "bet", "fsl"):
        steps.append(f"the brain was extracted with FSL BET{ver('fsl')} {cite('bet')}")
    elif ss and ss != "none":
        steps.append(f"the brain was extracted with {p.get('skull_stripping')}")
    else:
        steps.append("the input was taken as already skull-stripped (its voxels above 0 form the brain mask)")
    if p.get("n4"):
        steps.append(f"intensity non-uniformity was corrected with N4 {cite('n4')} as implemented in "
                     f"ANTs{ver('antspyx') or ver('ants')} {cite('ants')}")
    coreg = p.get("coregistration") or {}
    for mod, method in coreg.items():
        extra = f" {cite('ants')}" if "ants" in str(method).lower() else ""
        steps.append(f"the {mod} image was co-registered to the FLAIR ({method}){extra}")
    paras.append("Before segmentation, " + "; ".join(steps) + ".")
    members = int(p.get("ensemble_members") or 1)
    of = int(p.get("card_members") or members)
    used = ", ".join(str(i) for i in p.get("members_used") or [])
    subset = f" ({'member' if members == 1 else 'members'} {used} of the model's {of})" if of > members else ""
    tf = ver("tensorflow")
    keras = ver("keras")
    paras.append(
        f"Segmentation used the model {p.get('model_name', 'n/a')} (SHA-256 {p.get('model_sha256', 'n/a')}), "
        + (f"an ensemble of {members} networks{subset} whose softmax outputs were averaged, " if members > 1
           else f"a single network{subset}, ")
        + ("with test-time augmentation, " if p.get("tta") else "without test-time augmentation, ")
        + ("each slice cropped to the bounding box of its brain plus a margin, " if p.get("crop") == "brain" else "")
        + f"run with TensorFlow{tf}/Keras{keras} {cite('tensorflow')}.")
    lesdef = p.get("lesion_definition") or {}
    paras.append(
        f"Lesions were defined as {lesdef.get('connectivity', 26)}-connected components of the abnormal WMH "
        f"class of at least {_fmt(lesdef.get('min_volume_mm3', 0))} mm³, and classified as periventricular, "
        f"juxtacortical or deep by their distance to the ventricles and to the brain surface. Volumes are "
        f"reported in mL and as a fraction of the intracranial volume.")
    cv = p.get("cross_validation") or {}
    if cv:
        parts = []
        for cls, m in cv.items():
            if not isinstance(m, dict):  # a flat {metric: value} record
                parts.append(f"{_name(cls)} {_fmt(m)}")
                continue
            n = m.get("n_subjects")
            figs = ", ".join(f"{_name(k)} {_fmt(v)}" for k, v in m.items() if k != "n_subjects")
            parts.append(f"{cls}{f' (n = {_fmt(n)} subjects)' if n is not None else ''}: {figs}")
        paras.append("In cross-validation on MS3SEG, the model reached " + "; ".join(parts) + ".")
    else:
        paras.append("No cross-validation figures were recorded for this model.")
    others = [f"{k} {v}" for k, v in (p.get("software") or {}).items()]
    if others:
        paras.append("Software versions: " + ", ".join(others) + ".")
    paras.append(f"Run date: {p.get('run_date', 'n/a')}.")
    return {"paragraphs": paras, "references": refs}


def _name(key: str) -> str:
    return {"dice": "Dice", "hd95_mm": "HD95 (mm)", "lesion_f1": "lesion-wise F1", "precision": "precision",
            "recall": "recall", "avd": "relative absolute volume difference",
            "ltpr": "lesion-wise true-positive rate", "lfpr": "lesion-wise false-positive rate"}.get(str(key), str(key).replace("_", " "))


def lesion_rows(lesions: pd.DataFrame, can_affine: np.ndarray) -> tuple[list[str], list[list[str]], dict]:
    """Human column names, formatted rows and the lesion-id marks per axial slice.

    The axial slice (RAS+ voxel index along inferior->superior, as in the figures and the
    viewer) is computed from the centroid (scanner RAS+ mm).
    """
    lesions = lesions.copy()
    marks: dict[int, list] = {}
    if len(lesions):
        xyz = lesions[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(float)
        ijk = nib.affines.apply_affine(np.linalg.inv(can_affine), xyz)
        lesions["slice"] = np.rint(ijk[:, 2]).astype(int)
        for (i, j, k), lid in zip(ijk, lesions["lesion_id"]):
            marks.setdefault(int(round(k)), []).append((float(i), float(j), str(lid)))
    else:
        lesions["slice"] = pd.Series(dtype=int)
    cols = [c for c in LESION_COLUMNS if c in lesions.columns]
    cols += [c for c in lesions.columns if c not in cols]
    nd = {"volume_mm3": 4, "n_voxels": 6}
    rows = [[_fmt(r[c], nd.get(c, 3)) for c in cols] for _, r in lesions.iterrows()]
    return [LESION_COLUMNS.get(c, c.replace("_", " ")) for c in cols], rows, marks


def slice_marks(can_dseg: np.ndarray, lesions: pd.DataFrame, can_affine: np.ndarray,
                lesion_class: int = LABELS[LESION_CLASS]) -> dict:
    """Lesion-id positions on every axial slice a lesion spans (not only its centroid slice).

    Each lesion is matched to the 26-connected abnormal-WMH component holding its centroid
    voxel (or, failing that, the component with the nearest centroid); its id is drawn at
    the in-slice centre of that component on each of the component's slices.

    Parameters
    ----------
    can_dseg : ndarray, (I, J, K) uint8
        RAS+ tri-mask.
    lesions : DataFrame
        Lesion table (centroids in scanner RAS+ mm).
    can_affine : ndarray, (4, 4)
        Voxel to mm of the RAS+ grid.
    lesion_class : int
        Label value of abnormal WMH (from the model card; default the MS3SEG tri-mask's).

    Returns
    -------
    dict: slice index -> list of (i, j, lesion id str) in RAS+ voxel coordinates.
    """
    from scipy import ndimage

    from ..distance import bounding_box
    from ..lesion_definition import LESION

    if not len(lesions):
        return {}
    # components inside the lesions' bounding box, centres from the lesion voxels only
    # (ndimage.center_of_mass would make float64 volumes: 1.3 GB for a 512x512x300 scan)
    roi = bounding_box(can_dseg == lesion_class)
    if roi is None:
        return {}
    origin = np.array([r.start for r in roi])
    comp, n = ndimage.label(can_dseg[roi] == lesion_class, structure=LESION.structure())
    vox = np.nonzero(comp)
    ids = comp[vox] - 1
    centres = np.column_stack([np.bincount(ids, weights=v, minlength=n) for v in vox]) / np.bincount(ids)[:, None]
    ijk = nib.affines.apply_affine(np.linalg.inv(can_affine),
                                   lesions[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(float))
    boxes = ndimage.find_objects(comp)
    marks: dict[int, list] = {}
    for (i, j, k), lid in zip(ijk - origin, lesions["lesion_id"]):
        v = np.rint([i, j, k]).astype(int)
        inside = bool(((v >= 0) & (v < comp.shape)).all())
        c = (int(comp[tuple(v)]) if inside else 0) or int(np.argmin(((centres - [i, j, k]) ** 2).sum(1))) + 1
        box = boxes[c - 1]
        sub = comp[box] == c
        for dk in range(sub.shape[2]):
            pts = np.argwhere(sub[:, :, dk])
            if len(pts):
                ci, cj = pts.mean(0) + [box[0].start + origin[0], box[1].start + origin[1]]
                marks.setdefault(int(box[2].start + origin[2] + dk), []).append((float(ci), float(cj), str(lid)))
    return marks


# --------------------------------------------------------------------------- report


def write_participant_report(path: Path, *, title: str, flair_name: str, flair: nib.Nifti1Image,
                             dseg: np.ndarray, brain_mask: np.ndarray, coreg: dict,
                             lesions: pd.DataFrame, volumes: dict, warnings: list[str],
                             provenance: dict, metadata: dict, group_href: str = "group.html",
                             classes=None) -> Path:
    """Write the participant report ``sub-<L>[_ses-<L>...].html`` (one self-contained file).

    Parameters
    ----------
    path : Path
        Output HTML file (written atomically).
    title : str
        Report title, e.g. the BIDS prefix ``sub-01_ses-01`` (escaped).
    flair_name : str
        File name of the input FLAIR (escaped).
    flair : nibabel.Nifti1Image
        Input FLAIR, 3-D, any storage orientation, float data.
    dseg : ndarray, (I, J, K) uint8
        Tri-mask on the FLAIR grid, same storage order as ``flair``: 0 background,
        1 ventricles, 2 normal WMH, 3 abnormal WMH.
    brain_mask : ndarray, (I, J, K) bool
        Brain mask on the FLAIR grid.
    coreg : dict
        Modality (``"T1w"``, ``"T2w"``) -> nibabel image resampled on the FLAIR grid; may be empty.
    lesions : pandas.DataFrame
        One row per lesion: lesion_id, n_voxels, volume_mm3, centroid_{x,y,z}_mm (scanner
        RAS+ mm), mean_probability, uncertainty (0-1), dist_ventricles_mm,
        dist_brain_surface_mm, location. May be empty.
    volumes : dict
        ``*_ml`` (mL), ``*_icv_fraction`` (0-1), ``lesion_count``, ``icv_ml`` and per location
        ``lesion_<loc>_ml``, ``lesion_<loc>_count``, ``lesion_<loc>_share`` (0-1).
    warnings : list of str
        QC warnings, listed prominently at the top.
    provenance : dict
        Versions, model, preprocessing choices, cross-validation figures, lesion
        definition and run date (see :func:`methods_text`).
    metadata : dict
        Acquisition sidecar fields (acquisition parameters only: :func:`~ms3seg_app.derivatives.safe_metadata`).
    group_href : str, optional
        Relative link to the group report.
    classes : sequence of :class:`~ms3seg_app.model.card.ClassInfo`, optional
        Class table of the model card that made ``dseg``: label values, names and colours
        of the overlays, legend and viewer (default: the MS3SEG tri-mask).

    Returns
    -------
    Path
        ``path``.
    """
    t0 = time.perf_counter()
    flair = nib.Nifti1Image(np.asarray(flair.dataobj, dtype=np.float32).reshape(flair.shape[:3]), flair.affine)
    mods = {m: im for m, im in (coreg or {}).items() if im is not None}
    arrays = [np.asarray(dseg, np.uint8), np.asarray(brain_mask, bool)]
    arrays += [np.asarray(im.dataobj, np.float32).reshape(im.shape[:3]) for im in mods.values()]
    can, out = _reorient(flair, *arrays)
    f, d, m = np.asarray(can.dataobj, np.float32), out[0], out[1]
    moving = dict(zip(mods, out[2:]))
    zooms = can.header.get_zooms()[:3]
    lo, hi = _window(f, m)
    nk = f.shape[2]
    head = [k for k in range(nk) if (f[:, :, k] > lo + 0.05 * (hi - lo)).any()] or list(range(nk))
    brain = [k for k in range(nk) if m[:, :, k].any()] or head

    table = class_table(classes)
    awmh_label = class_index(class_infos(classes), LESION_CLASS, "the report's class table")
    columns, rows, centroid_marks = lesion_rows(lesions, can.affine)
    marks = slice_marks(d, lesions, can.affine, awmh_label) or centroid_marks
    figs = {}
    figs["headline"] = _mosaic(_even(brain, 12), f, zooms, lo, hi, labels=d, marks=marks, classes=table,
                               lesion_label=awmh_label)
    check_ks = _even(head, 8)
    figs["brainmask"] = _mosaic(check_ks, f, zooms, lo, hi, contour=m, tile_in=2.2)
    figs["coreg"] = []
    flair_edges = _edges(f, m) if moving else None
    for mod, arr in moving.items():
        wlo, whi = _window(arr, m)
        figs["coreg"].append({"modality": mod, "png": _mosaic(check_ks, arr, zooms, wlo, whi,
                                                              edges=flair_edges, tile_in=2.2)})
    awmh = [k for k in range(nk) if (d[:, :, k] == awmh_label).any()]
    # every slice with lesions, or (more than 24) those with lesion ids first, then the most lesion voxels
    findings = sorted(awmh, key=lambda k: (-len(centroid_marks.get(k, [])), -int((d[:, :, k] == awmh_label).sum())))[:24]
    figs["findings"] = (_mosaic(sorted(findings), f, zooms, lo, hi, labels=d, marks=marks, classes=table,
                                lesion_label=awmh_label) if findings else None)
    t_fig = time.perf_counter() - t0
    viewer = viewer_data(f, d, can.affine, lo, hi)
    html = env().get_template("participant.html.j2").render(
        csp_script_src=CSP_SCRIPT_PLACEHOLDER, title=title, version=__version__, flair=flair_name,
        group_href=group_href,
        classes=[c for c in table if c["index"]],
        warnings=list(warnings or []), key=key_figures(volumes, classes), volumes=volumes,
        lesion_columns=columns, lesion_rows=rows, figs=figs, n_findings=len(awmh), n_shown=len(findings),
        methods=methods_text(provenance), provenance=provenance or {}, metadata=metadata or {},
        shape=list(f.shape), zooms=[round(float(z), 3) for z in zooms],
        viewer=viewer, viewer_config={"shape": viewer["shape"], "window": viewer["window"],
                                      "max": viewer["max"], "classes": {str(c["index"]): c["color"]
                                                                        for c in table}},
        niivue_js=niivue_js(), niivue_version=NIIVUE_VERSION)
    out_path = atomic_write_text(Path(path), finalize_csp(html))
    LOGGER.info("%s: report in %.2f s (figures %.2f s), %.1f MB (viewer data %.1f MB)", title,
                time.perf_counter() - t0, t_fig, out_path.stat().st_size / 1e6, viewer["n_bytes"] / 1e6)
    return out_path
