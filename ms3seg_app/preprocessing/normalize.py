"""Intensity normalisation of FLAIR volumes (one implementation for training and inference)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import head_mask

#: Methods understood by :func:`normalize`; the model card names one of them.
METHODS = ("tissue_mode", "head_percentile", "minmax")


def tissue_mode(values: np.ndarray, bins: int = 256, smooth_bins: float = 3.0) -> float:
    """Intensity of the most frequent tissue: the peak of the smoothed foreground histogram.

    On FLAIR the largest histogram peak of the head (or brain) foreground is white
    and grey matter, whatever surrounds the brain: the same tissue reference whether
    the scan is whole-head or skull-stripped. This is the anchor of WhiteStripe
    (Shinohara et al., NeuroImage: Clinical 2014), which takes the white-matter mode;
    on the development scans the mode of the head and of the BET brain differ by
    < 2 %, while the head's 99th percentile differs by a factor ~2.

    Parameters
    ----------
    values : ndarray, any shape, real
        Foreground intensities (head or brain voxels).
    bins : int
        Histogram bins between the 1st and 99.5th percentile.
    smooth_bins : float
        Gaussian smoothing (in bins) of the histogram before taking its maximum.

    Returns
    -------
    float, in the units of ``values``.

    Raises
    ------
    ValueError
        No values, or all values equal.
    """
    v = np.asarray(values).ravel()  # float32 stays float32: a large scan's foreground is not copied to float64
    if v.size == 0:
        raise ValueError("no foreground voxels: the image is empty or constant")
    lo, hi = np.percentile(v, [1.0, 99.5])
    if hi <= lo:
        raise ValueError("constant image: no intensity spread in the foreground")
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), smooth_bins)
    k = int(np.argmax(hist))
    return float(0.5 * (edges[k] + edges[k + 1]))


def normalize(data: np.ndarray, method: str = "tissue_mode", upper_percentile: float = 99.0,
              clip_max: float = 1.5, mask: np.ndarray | None = None, mode_value: float = 1.0) -> np.ndarray:
    """Normalise a FLAIR volume (or slice) for the model.

    Parameters
    ----------
    data : ndarray (X, Y, Z) or (H, W), real dtype
        FLAIR intensities, finite.
    method : {"tissue_mode", "head_percentile", "minmax"}
        ``tissue_mode`` (model v2): divide by :func:`tissue_mode` of the foreground and
        multiply by ``mode_value``, clip to ``[0, clip_max]``; the same tissue gets
        the same value with or without skull (tested).
        ``head_percentile`` (model v1): divide by the ``upper_percentile`` of the head
        voxels; depends on how much bright scalp the image holds.
        ``minmax``: the MS3SEG recipe, per-volume min-max to [0, 1]
        (Bashiri Bawil et al. 2025), for their published weights.
    upper_percentile : float
        ``head_percentile`` only: percentile (0-100) of head voxels mapped to 1.0.
    clip_max : float
        Upper clip after scaling.
    mask : ndarray bool, same shape as ``data``, optional
        Foreground voxels the anchor is taken over (default: Otsu head mask).
    mode_value : float
        ``tissue_mode`` only: the value the tissue mode is mapped to.

    Returns
    -------
    ndarray, shape of ``data``, float32

    Raises
    ------
    ValueError
        If the image is constant, empty, or ``method`` unknown.
    """
    x = np.asarray(data, dtype=np.float32)
    if x.size == 0 or float(x.max()) <= float(x.min()):
        raise ValueError("constant image: every voxel has the same value")
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo)
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {METHODS}")
    if mask is None:
        mask = head_mask(x if x.ndim == 3 else x[:, :, None])
        mask = mask if x.ndim == 3 else mask[:, :, 0]
    m = np.asarray(mask, bool)
    vals = x[m] if m.any() else x[x > 0]
    if vals.size == 0:
        raise ValueError("no foreground voxels: the image is empty or constant")
    lo = min(float(np.percentile(x, 0.5)), 0.0)
    if method == "tissue_mode":
        ref = tissue_mode(vals)
        del vals
        if ref <= lo:
            raise ValueError("constant image: the tissue mode equals the background level")
        out = np.subtract(x, np.float32(lo), dtype=np.float32)  # one output array, scaled in place
        out *= np.float32(mode_value / (ref - lo))
        return np.clip(out, 0.0, clip_max, out=out)
    hi = float(np.percentile(vals, upper_percentile))
    if hi <= lo:
        raise ValueError("constant image: upper percentile equals the background level")
    return np.clip((x - lo) / (hi - lo), 0.0, clip_max).astype(np.float32)
