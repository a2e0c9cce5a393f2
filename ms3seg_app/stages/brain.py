"""Stage 3: brain extraction (FSL BET when installed, else deepbet; ``none`` for skull-stripped input)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..exceptions import InputDataError

LOGGER = logging.getLogger("ms3seg.stages")


def fsl_available() -> bool:
    """FSL's ``bet`` and ``flirt`` on the PATH with ``FSLDIR`` set."""
    return bool(shutil.which("bet") and shutil.which("flirt") and os.environ.get("FSLDIR"))


def brain_mask(img: nib.Nifti1Image, method: str = "auto", work_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """Brain mask on the image grid.

    Parameters
    ----------
    img : Nifti1Image, 3D
    method : {"auto", "fsl", "deepbet", "none"}
        ``auto``: FSL BET if installed, else deepbet. ``none``: the input is already
        skull-stripped; the mask is its non-zero voxels (holes filled per slice).

    Returns
    -------
    (ndarray (I, J, K) bool, str method used)

    Raises
    ------
    InputDataError
        ``fsl`` requested without FSL, or an empty mask.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    if method == "auto":
        method = "fsl" if fsl_available() else "deepbet"
    if method == "none":
        mask = data > 0
        for k in range(mask.shape[2]):
            mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    elif method == "fsl":
        if not fsl_available():
            raise InputDataError("--skull-strip fsl asked for FSL, but bet/flirt or FSLDIR are missing; "
                                 "install FSL or use --skull-strip deepbet")
        mask = _bet_fsl(img, work_dir)
    elif method == "deepbet":
        mask = _bet_deepbet(img)
    else:
        raise ValueError(f"unknown skull-strip method {method!r}")
    if not mask.any():
        raise InputDataError(f"brain extraction ({method}) returned an empty mask; try --skull-strip none "
                             "for skull-stripped inputs")
    return mask, method


def _bet_deepbet(img: nib.Nifti1Image) -> np.ndarray:
    """deepbet's networks (Fisch et al. 2024) in Keras: no PyTorch (:mod:`ms3seg_app.brain_extraction`)."""
    from ..brain_extraction import deepbet_mask

    mask = deepbet_mask(img)
    if mask.shape != img.shape:
        raise InputDataError(f"deepbet returned a mask of shape {mask.shape} for an image of {img.shape}")
    # deepbet resamples to 256^3 and back by nearest neighbour; fill slice holes left by it
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def _bet_fsl(img: nib.Nifti1Image, work_dir: Path | None) -> np.ndarray:
    from nipype.interfaces import fsl

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        src = Path(tmp) / "flair.nii.gz"
        nib.save(img, str(src))
        res = fsl.BET(in_file=str(src), mask=True, frac=0.5, robust=True, output_type="NIFTI_GZ",
                      out_file=str(Path(tmp) / "brain.nii.gz")).run()
        return np.asanyarray(nib.load(res.outputs.mask_file).dataobj) > 0


def restrict_to_brain(mask: np.ndarray, spacing) -> np.ndarray:
    """Brain mask dilated by ~2 mm in-plane: the region where findings are kept.

    Parameters
    ----------
    mask : ndarray (I, J, K) bool, stored order (axis K the slice axis of 2D FLAIR)
    spacing : 3 floats, voxel size in mm

    Returns
    -------
    ndarray (I, J, K) bool
    """
    iters = max(1, int(round(2.0 / max(min(spacing[:2]), 0.1))))
    st = np.zeros((3, 3, 1), bool)
    st[:, :, 0] = True
    return ndimage.binary_dilation(mask, st, iterations=iters)
