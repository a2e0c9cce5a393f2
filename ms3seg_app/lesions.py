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
so thick slices count with their real thickness. Lesions are 26-connected components of
class 3 with a volume of at least ``MIN_LESION_MM3`` = 3 mm³ (Anima's lesion analyser).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from .evaluation.metrics import STRUCT26

PERIVENTRICULAR_MM = 3.0
JUXTACORTICAL_MM = 3.0
CORTEX_MM = 3.0
MIN_LESION_MM3 = 3.0
LOCATIONS = ("periventricular", "juxtacortical", "deep")


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm³: |det| of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def lesion_table(dseg: np.ndarray, affine: np.ndarray, brain_mask: np.ndarray | None = None,
                 awmh_prob: np.ndarray | None = None) -> pd.DataFrame:
    """One row per abnormal-WMH lesion.

    Parameters
    ----------
    dseg : ndarray (I, J, K) uint8
        Tri-mask on the FLAIR grid (0 BG, 1 VEN, 2 NWMH, 3 AWMH).
    affine : ndarray (4, 4)
        Voxel -> scanner RAS+ mm.
    brain_mask : ndarray (I, J, K) bool, optional
        For the juxtacortical test; without it no lesion is called juxtacortical.
    awmh_prob : ndarray (I, J, K) float, optional
        Abnormal-WMH probability for the mean-probability column.

    Returns
    -------
    DataFrame with columns lesion_id, n_voxels, volume_mm3, centroid_x_mm,
    centroid_y_mm, centroid_z_mm (scanner RAS+), mean_probability,
    dist_ventricles_mm, dist_brain_surface_mm, location.
    """
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    vox_mm3 = voxel_volume_mm3(affine)
    lab, n = ndimage.label(dseg == 3, structure=STRUCT26)
    cols = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
            "mean_probability", "dist_ventricles_mm", "dist_brain_surface_mm", "location"]
    if n == 0:
        return pd.DataFrame(columns=cols)
    vent = dseg == 1
    d_vent = (ndimage.distance_transform_edt(~vent, sampling=spacing) if vent.any()
              else np.full(dseg.shape, np.inf))
    if brain_mask is not None and np.asarray(brain_mask).any():
        bm = np.asarray(brain_mask, bool)
        d_surf = ndimage.distance_transform_edt(bm, sampling=spacing)  # inside: distance to outside
    else:
        d_surf = np.full(dseg.shape, np.inf)
    idx = np.arange(1, n + 1)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    centroids = np.array(ndimage.center_of_mass(lab > 0, lab, idx)).reshape(n, 3)
    world = (np.c_[centroids, np.ones(n)] @ np.asarray(affine).T)[:, :3]
    dv = ndimage.minimum(d_vent, lab, idx)
    ds = ndimage.minimum(d_surf, lab, idx)
    mp = ndimage.mean(awmh_prob, lab, idx) if awmh_prob is not None else np.full(n, np.nan)
    rows = []
    new_id = 0
    for i in range(n):
        vol = float(counts[i] * vox_mm3)
        if vol < MIN_LESION_MM3:
            continue
        new_id += 1
        if dv[i] <= PERIVENTRICULAR_MM:
            loc = "periventricular"
        elif ds[i] <= JUXTACORTICAL_MM + CORTEX_MM:
            loc = "juxtacortical"
        else:
            loc = "deep"
        rows.append([new_id, int(counts[i]), vol, *map(float, world[i]), float(mp[i]),
                     float(dv[i]), float(ds[i]), loc])
    return pd.DataFrame(rows, columns=cols)


def volume_table(dseg: np.ndarray, affine: np.ndarray, lesions: pd.DataFrame,
                 brain_mask: np.ndarray | None = None) -> dict:
    """Burden summary of one FLAIR (one row of the volumes table).

    Returns
    -------
    dict: ``<class>_ml`` for ventricles, normal_wmh, abnormal_wmh; lesion_count;
    icv_ml (brain-mask volume, an intracranial-volume estimate; NaN without a mask);
    ``<class>_icv_fraction``; ``lesion_<location>_ml``, ``_count`` and ``_share`` for
    periventricular, juxtacortical and deep lesions (share of lesion volume).
    """
    ml = voxel_volume_mm3(affine) / 1000.0
    out = {
        "ventricles_ml": float((dseg == 1).sum() * ml),
        "normal_wmh_ml": float((dseg == 2).sum() * ml),
        "abnormal_wmh_ml": float((dseg == 3).sum() * ml),
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
