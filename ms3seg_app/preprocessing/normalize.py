"""Intensity normalisation of FLAIR volumes (one implementation for training and inference)."""
from __future__ import annotations

import numpy as np

from .geometry import head_mask

#: Methods understood by :func:`normalize`; the model card names one of them.
METHODS = ("head_percentile", "minmax")


def normalize(data: np.ndarray, method: str = "head_percentile", upper_percentile: float = 99.0,
              clip_max: float = 1.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise a FLAIR volume for the model.

    Parameters
    ----------
    data : ndarray (X, Y, Z), real dtype
        FLAIR intensities, finite.
    method : {"head_percentile", "minmax"}
        ``head_percentile`` (ours): divide by the ``upper_percentile`` of the voxels
        inside the head (Otsu mask), clip to ``[0, clip_max]``. Independent of the
        scanner's arbitrary scale and robust to a few bright outliers; works on
        whole-head and skull-stripped images.
        ``minmax``: the MS3SEG recipe, per-volume min-max to [0, 1]
        (Bashiri Bawil et al. 2025), for their published weights.
    upper_percentile : float
        Percentile (0-100) of head voxels mapped to 1.0.
    clip_max : float
        Upper clip after scaling.
    mask : ndarray (X, Y, Z) bool, optional
        Voxels to take the percentile over (default: head mask).

    Returns
    -------
    ndarray (X, Y, Z) float32

    Raises
    ------
    ValueError
        If the volume is constant (nothing to normalise).
    """
    x = np.asarray(data, dtype=np.float32)
    if x.size == 0 or float(x.max()) <= float(x.min()):
        raise ValueError("constant image: every voxel has the same value")
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            raise ValueError("constant image: min == max")
        return (x - lo) / (hi - lo)
    if method != "head_percentile":
        raise ValueError(f"unknown normalisation {method!r}; expected one of {METHODS}")
    m = head_mask(x) if mask is None else np.asarray(mask, bool)
    vals = x[m] if m.any() else x[x > 0]
    if vals.size == 0:
        raise ValueError("no foreground voxels: the image is empty or constant")
    lo = min(float(np.percentile(x, 0.5)), 0.0)
    hi = float(np.percentile(vals, upper_percentile))
    if hi <= lo:
        raise ValueError("constant image: upper percentile equals the background level")
    return np.clip((x - lo) / (hi - lo), 0.0, clip_max).astype(np.float32)
