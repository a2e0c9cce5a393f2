"""A FLAIR volume to model-input slices: the one path shared by training and inference."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from .geometry import SliceGeometry, head_mask, inferior_superior_axis
from .normalize import normalize


def to_model_slices(img: nib.spatialimages.SpatialImage, pre: dict) -> tuple[SliceGeometry, np.ndarray]:
    """Reorient, resample and normalise a FLAIR as the model card's preprocessing says.

    The Otsu head mask is computed once: it centres the slices and is the foreground
    the intensity anchor is taken over (``tissue_mode``, ``head_percentile``).

    Parameters
    ----------
    img : nibabel image, 3D, any storage order
    pre : dict
        The card's ``preprocessing`` block (``pixel_size_mm``, ``slice_size``, ``normalization``).

    Returns
    -------
    (geometry, slices) : SliceGeometry and ndarray (Z, H, W) float32 of axial RAS+ slices
        (``geometry.inverse`` maps per-slice outputs back onto ``img``'s voxel grid).
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    head = head_mask(data, axis=inferior_superior_axis(img.affine))  # axial slices, whatever the storage order
    geom = SliceGeometry.from_image(img, pre["pixel_size_mm"], pre["slice_size"], centre_on=head)
    norm = dict(pre["normalization"])
    if norm.get("method", "head_percentile") != "minmax":
        norm["mask"] = head  # the mask normalize() would compute itself (10 s of a 512x512x300 scan)
    return geom, geom.forward(normalize(data, **norm), order=1).astype(np.float32)
