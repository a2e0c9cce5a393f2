"""Lesion analysis of a tri-mask: per-lesion table, location classes and burden volumes.

Location classes (first that applies):

periventricular
    the lesion comes within ``PERIVENTRICULAR_MM`` = 3 mm of the ventricles
    (MRI_MS_Insights, PEWMH <= 3 mm from the ventricle surface; MAGNIMS 2016
    consensus describes periventricular lesions as touching the ventricles; LST-AI
    uses a one-voxel dilation, SHiVAi <= 2 mm).
juxtacortical
    the lesion comes within ``JUXTACORTICAL_MM`` = 3 mm of the cortex. Without a
    grey-matter segmentation the cortex is approximated by the outer
    ``CORTEX_MM`` = 3 mm shell of the brain mask, so the test is "within 6 mm of the
    brain surface". This approximation misses lesions next to deep sulci.
deep white matter
    otherwise (MRI_MS_Insights' paraventricular/deep class). Infratentorial lesions
    are not separated: without an atlas registration it cannot be told reliably on
    20-slice clinical FLAIR.

Distances are Euclidean in mm between voxel centres, with the voxel spacing (scipy.ndimage.distance_transform_edt),
so thick slices count with their real thickness. Lesions are defined once, in
:mod:`ms3seg_app.lesion_definition` (26-connected, at least 3 mm³).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import LABELS, LESION_CLASS
from .distance import bounding_box, component_min_distance, label_counts
from .lesion_definition import LESION

PERIVENTRICULAR_MM = 3.0
JUXTACORTICAL_MM = 3.0
CORTEX_MM = 3.0
LOCATIONS = ("periventricular", "juxtacortical", "deep")


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm³: |det| of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def lesion_table(dseg: np.ndarray, affine: np.ndarray, brain_mask: np.ndarray | None = None,
                 awmh_prob: np.ndarray | None = None, uncertainty: np.ndarray | None = None,
                 lesion_class: int = LABELS[LESION_CLASS], ventricle_class: int = LABELS["VEN"],
                 value_box: tuple | None = None) -> pd.DataFrame:
    """One row per abnormal-WMH lesion (:data:`~ms3seg_app.lesion_definition.LESION`).

    Parameters
    ----------
    dseg : ndarray (I, J, K) uint8
        Tri-mask on the FLAIR grid (0 BG, 1 VEN, 2 NWMH, 3 AWMH).
    affine : ndarray (4, 4)
        Voxel -> scanner RAS+ mm.
    brain_mask : ndarray (I, J, K) bool, optional
        For the juxtacortical test; without it no lesion is called juxtacortical.
    awmh_prob : ndarray (I, J, K) float, optional
        Abnormal-WMH probability for the mean-probability column (or its ``value_box`` part).
    uncertainty : ndarray (I, J, K) float, optional
        Per-voxel disagreement of the ensemble members (standard deviation of their
        abnormal-WMH probabilities, 0-0.5); the ``uncertainty`` column is its mean over
        the lesion's voxels, times 2 so that it runs 0 (members agree) to 1 (half the
        members certain of a lesion, half certain of none). NaN (``n/a``) without it: a
        single network has no spread.
    lesion_class, ventricle_class : int
        Label values of abnormal WMH and ventricles (from the model card; default the
        MS3SEG tri-mask's, :data:`ms3seg_app.LABELS`).
    value_box : tuple of 3 slices, optional
        The stored-order region that ``awmh_prob`` and ``uncertainty`` cover when they are
        not whole-grid (:attr:`ms3seg_app.model.predict.Prediction.box`, the brain's box,
        which holds every lesion voxel).

    Raises
    ------
    ValueError
        If ``awmh_prob`` or ``uncertainty`` is not the shape of ``dseg`` (or of ``value_box``),
        or a lesion voxel lies outside ``value_box``.

    Returns
    -------
    DataFrame with columns lesion_id, n_voxels, volume_mm3, centroid_x_mm,
    centroid_y_mm, centroid_z_mm (scanner RAS+), mean_probability, uncertainty,
    dist_ventricles_mm, dist_brain_surface_mm, location.
    """
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    vox_mm3 = voxel_volume_mm3(affine)
    les = dseg == lesion_class
    cols = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
            "mean_probability", "uncertainty", "dist_ventricles_mm", "dist_brain_surface_mm", "location"]
    if not les.any():
        return pd.DataFrame(columns=cols)
    # everything inside the bounding box (+2 voxels) of the brain and the lesions: ventricles
    # and lesions lie in it and it keeps non-brain voxels at its border; lesions are numbered
    # as in the whole volume (raster order is kept by a translation); distances are asked
    # only of lesion voxels (:mod:`ms3seg_app.distance`): a large scan's air and neck cost nothing
    box = _brain_box(brain_mask, les)
    lab_box, n = LESION.label(les[box], vox_mm3)
    del les
    if n == 0:
        return pd.DataFrame(columns=cols)
    dv = component_min_distance(lab_box, n, dseg[box] == ventricle_class, spacing)
    if brain_mask is not None and np.asarray(brain_mask).any():
        ds = component_min_distance(lab_box, n, ~np.asarray(brain_mask, bool)[box], spacing)
    else:
        ds = np.full(n, np.inf)
    # per-lesion sums over the lesion voxels only (ndimage.mean would cast the whole box to
    # float64: 0.4 GB of a 512x512x300 scan)
    vox = np.nonzero(lab_box)
    ids = lab_box[vox] - 1
    counts = np.bincount(ids, minlength=n)
    centroids = np.column_stack([np.bincount(ids, weights=v, minlength=n) for v in vox]) / counts[:, None]
    centroids += [s.start for s in box]
    world = (np.c_[centroids, np.ones(n)] @ np.asarray(affine).T)[:, :3]
    absolute = tuple(v + s.start for v, s in zip(vox, box))
    region = dseg.shape if value_box is None else tuple(s.stop - s.start for s in value_box)
    for name, vol in (("awmh_prob", awmh_prob), ("uncertainty", uncertainty)):
        if vol is not None and tuple(np.shape(vol)) != tuple(region):
            raise ValueError(f"{name} has shape {np.shape(vol)}, expected {tuple(region)} "
                             f"({'the tri-mask' if value_box is None else 'value_box'})")
    if value_box is not None and (awmh_prob is not None or uncertainty is not None):
        absolute = tuple(v - s.start for v, s in zip(absolute, value_box))
        if any(v.size and (v.min() < 0 or v.max() >= s.stop - s.start) for v, s in zip(absolute, value_box)):
            raise ValueError(f"lesion voxels lie outside the probabilities' box {value_box}")

    def lesion_mean(vol):
        return np.bincount(ids, weights=np.asarray(vol[absolute], np.float64), minlength=n) / counts

    mp = lesion_mean(awmh_prob) if awmh_prob is not None else np.full(n, np.nan)
    unc = 2.0 * lesion_mean(uncertainty) if uncertainty is not None else np.full(n, np.nan)
    rows = []
    for i in range(n):
        vol = float(counts[i] * vox_mm3)
        if dv[i] <= PERIVENTRICULAR_MM:
            loc = "periventricular"
        elif ds[i] <= JUXTACORTICAL_MM + CORTEX_MM:
            loc = "juxtacortical"
        else:
            loc = "deep"
        rows.append([i + 1, int(counts[i]), vol, *map(float, world[i]), float(mp[i]), float(unc[i]),
                     float(dv[i]), float(ds[i]), loc])
    return pd.DataFrame(rows, columns=cols)


def _brain_box(brain_mask, lesions: np.ndarray) -> tuple:
    """Bounding box (slices) of the brain mask and the lesions, grown by 2 voxels and clipped."""
    fg = lesions if brain_mask is None else (np.asarray(brain_mask, bool) | lesions)
    return bounding_box(fg, 2)


def volume_table(dseg: np.ndarray, affine: np.ndarray, lesions: pd.DataFrame,
                 brain_mask: np.ndarray | None = None, card=None) -> dict:
    """Burden summary of one FLAIR (one row of the volumes table).

    Parameters
    ----------
    dseg : ndarray (I, J, K) uint8 tri-mask
    affine : ndarray (4, 4) voxel -> RAS+ mm
    lesions : DataFrame from :func:`lesion_table`
    brain_mask : ndarray (I, J, K) bool, optional
    card : ModelCard, optional
        Gives the label values of VEN, NWMH and AWMH (default the MS3SEG tri-mask's, :data:`ms3seg_app.LABELS`).

    Returns
    -------
    dict: ``<class>_ml`` for ventricles, normal_wmh, abnormal_wmh; lesion_count;
    icv_ml (brain-mask volume, an intracranial-volume estimate; NaN without a mask);
    ``<class>_icv_fraction``; ``lesion_<location>_ml``, ``_count`` and ``_share`` for
    periventricular, juxtacortical and deep lesions (share of lesion volume).
    """
    ml = voxel_volume_mm3(affine) / 1000.0
    idx = {a: (card.class_index(a) if card is not None else LABELS[a]) for a in ("VEN", "NWMH", LESION_CLASS)}
    counts = label_counts(dseg, max(idx.values()) + 1)  # no int64 copy of the volume
    out = {
        "ventricles_ml": float(counts[idx["VEN"]] * ml),
        "normal_wmh_ml": float(counts[idx["NWMH"]] * ml),
        "abnormal_wmh_ml": float(counts[idx[LESION_CLASS]] * ml),
        "lesion_count": int(len(lesions)),
        "icv_ml": float(np.asarray(brain_mask, bool).sum() * ml) if brain_mask is not None else float("nan"),
    }
    for c in ("ventricles", "normal_wmh", "abnormal_wmh"):
        out[f"{c}_icv_fraction"] = out[f"{c}_ml"] / out["icv_ml"] if out["icv_ml"] else float("nan")
    total = float(lesions["volume_mm3"].sum()) / 1000.0 if len(lesions) else 0.0
    for loc in LOCATIONS:
        sel = lesions[lesions["location"] == loc] if len(lesions) else lesions
        v = float(sel["volume_mm3"].sum()) / 1000.0 if len(sel) else 0.0
        out[f"lesion_{loc}_ml"] = v
        out[f"lesion_{loc}_count"] = int(len(sel))
        out[f"lesion_{loc}_share"] = v / total if total > 0 else float("nan")
    return out
