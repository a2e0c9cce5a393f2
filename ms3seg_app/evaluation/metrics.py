"""Segmentation metrics: voxel-wise overlap, surface distance, lesion-wise detection.

Definitions follow the MS lesion segmentation literature (e.g. Commowick et al.,
MSSEG-1, Sci Rep 2018; Maier-Hein et al., "Metrics reloaded", Nat Methods 2024):

- Dice = 2|P∩T| / (|P|+|T|); precision = |P∩T|/|P|; recall = |P∩T|/|T|.
- HD95: 95th percentile of the symmetric surface distances (mm), surfaces being the
  voxels of a mask that touch its complement (6-connectivity), distances by the
  Euclidean distance transform with the voxel spacing (scipy.ndimage).
- Absolute volume difference AVD = |Vp - Vt| / Vt.
- Lesion-wise: lesions as :data:`ms3seg_app.lesion_definition.LESION` defines them
  (26-connected, at least 3 mm³), on both sides. A true lesion is detected if any of
  its voxels is predicted; a predicted lesion is a false positive if none of its
  voxels is in the truth. LTPR = detected / true lesions, LFPR = false-positive /
  predicted lesions, lesion F1 = 2 LTPR (1-LFPR) / (LTPR + 1 - LFPR).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .. import LABELS, LESION_CLASS
from ..lesion_definition import LESION, LesionDefinition


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Dice, precision, recall and AVD of two binary masks of the same shape.

    Returns NaN where a ratio is undefined (e.g. recall with an empty truth); Dice of
    two empty masks is 1.
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {t.shape}")
    tp = np.logical_and(p, t).sum()
    np_, nt = p.sum(), t.sum()
    return {
        "dice": 1.0 if np_ + nt == 0 else 2.0 * tp / (np_ + nt),
        "precision": float(tp / np_) if np_ else float("nan"),
        "recall": float(tp / nt) if nt else float("nan"),
        "avd": float(abs(np_ - nt) / nt) if nt else float("nan"),
        "volume_pred_voxels": int(np_),
        "volume_true_voxels": int(nt),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance in mm.

    Parameters
    ----------
    pred, truth : ndarray (I, J, K) bool
    spacing : 3 floats, mm per voxel along each axis

    Returns
    -------
    float (mm); NaN if either mask is empty.
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() or not t.any():
        return float("nan")
    sp, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d = np.concatenate([dt_t[sp], dt_p[st]])
    return float(np.percentile(d, 95))


def lesion_wise(pred: np.ndarray, truth: np.ndarray, voxel_mm3: float,
                definition: LesionDefinition = LESION) -> dict:
    """Lesion-wise detection: LTPR, LFPR, lesion F1.

    Parameters
    ----------
    pred, truth : ndarray (I, J, K) bool
    voxel_mm3 : float
        Voxel volume (mm³), for the minimum lesion size.
    definition : LesionDefinition
        What a lesion is (default: the one definition of ms3seg-app).

    Returns
    -------
    dict with n_true, n_pred, tp_true (true lesions hit), fp_pred (predicted lesions
    with no overlap), ltpr, lfpr, lesion_f1 (NaN where undefined).
    """
    lt, nt = definition.label(truth, voxel_mm3)
    lp, npred = definition.label(pred, voxel_mm3)
    hit_true = len(np.setdiff1d(np.unique(lt[lp > 0]), [0]))
    hit_pred = len(np.setdiff1d(np.unique(lp[lt > 0]), [0]))
    fp = npred - hit_pred
    ltpr = hit_true / nt if nt else float("nan")
    lfpr = fp / npred if npred else float("nan")
    if nt and npred:
        prec = 1.0 - lfpr
        f1 = 0.0 if ltpr + prec == 0 else 2 * ltpr * prec / (ltpr + prec)
    elif nt == 0 and npred == 0:
        f1 = 1.0
    else:
        f1 = 0.0
    return {"n_true_lesions": nt, "n_pred_lesions": npred, "tp_true_lesions": hit_true,
            "fp_pred_lesions": fp, "ltpr": ltpr, "lfpr": lfpr, "lesion_f1": f1}


def evaluate_dseg(pred: np.ndarray, truth: np.ndarray, spacing, classes=(1, 2, 3),
                  annotated=None, lesion_definition: LesionDefinition = LESION) -> list[dict]:
    """All metrics of a predicted tri-mask against a manual one.

    Parameters
    ----------
    pred, truth : ndarray (I, J, K) int, labels 0-3, same voxel grid
    spacing : 3 floats (mm)
    classes : classes to score
    annotated : sequence of 4 bool, optional
        Classes not annotated in ``truth`` are skipped (their rows are omitted).
    lesion_definition : LesionDefinition
        For the lesion-wise metrics of class 3 (default: :data:`LESION`).

    Returns
    -------
    list of dict rows, one per class, with ``class`` and the metrics; volumes in mL.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for c in classes:
        if annotated is not None and not annotated[c]:
            continue
        p, t = pred == c, truth == c
        row = {"class": int(c), **overlap(p, t), "hd95_mm": hd95(p, t, spacing)}
        row["volume_pred_ml"] = row.pop("volume_pred_voxels") * voxel_ml
        row["volume_true_ml"] = row.pop("volume_true_voxels") * voxel_ml
        if c == LABELS[LESION_CLASS]:  # lesion-wise metrics for the lesion class of the reference's numbering
            row.update(lesion_wise(p, t, float(np.prod(spacing)), lesion_definition))
        rows.append(row)
    return rows
