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


#: ``--skull-strip auto`` takes a FLAIR as already skull-stripped when deepbet's bounding-box
#: network calls at least this fraction of its non-zero voxels brain (:func:`brain_fraction`).
#: Measured 2026-12-02: the 10 development FLAIRs skull-stripped with FSL BET 0.81-0.98, the same
#: FLAIRs whole-head 0.18-0.24, synthetic heads with a zero background and a thin skull 0.68-0.69.
STRIPPED_BRAIN_FRACTION = 0.75


def fsl_available() -> bool:
    """FSL's ``bet`` and ``flirt`` on the PATH with ``FSLDIR`` set."""
    return bool(shutil.which("bet") and shutil.which("flirt") and os.environ.get("FSLDIR"))


def brain_mask(img: nib.Nifti1Image, method: str = "auto", work_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """Brain mask on the image grid.

    Parameters
    ----------
    img : Nifti1Image, 3D
    method : {"auto", "fsl", "deepbet", "none"}
        ``none``: the input is already skull-stripped; the mask is its non-zero voxels
        (holes filled per slice). ``auto``: ``none`` when :func:`looks_skull_stripped`,
        else FSL BET if installed, else deepbet.

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
        stripped, why = looks_skull_stripped(img, data)
        if stripped:
            LOGGER.info("%s: taken as already skull-stripped (%s); its non-zero voxels are the brain mask",
                        img.get_filename() or "FLAIR", why)
            method = "none"
        else:
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


def looks_skull_stripped(img: nib.Nifti1Image, data: np.ndarray | None = None) -> tuple[bool, str]:
    """Whether a FLAIR is already skull-stripped, and the evidence, in words.

    Two tests, the cheap one first:

    1. the background at the edges of the slices is zero: every voxel on the four faces of the
       volume along the in-plane axes is 0 (to 0.1 % of the image maximum). After smriprep's
       ``_is_skull_stripped`` (fMRIPrep ``--skull-strip-t1w auto``), which tests all six faces;
       the top and bottom slices of a 2D FLAIR hold brain even when it is skull-stripped,
       so only the in-plane faces count. A raw head scan fails here (noise is not 0);
    2. deepbet's bounding-box network calls at least :data:`STRIPPED_BRAIN_FRACTION` of the
       non-zero voxels brain (:func:`~ms3seg_app.brain_extraction.brain_fraction`): a head
       whose background was zeroed (defaced or registered images) fails here.

    Parameters
    ----------
    img : Nifti1Image, 3D
    data : ndarray (I, J, K) float32, optional
        ``img``'s data, if already read.

    Returns
    -------
    (bool, str)
    """
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32) if data is None else data)
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if zooms.max() > 1.5 * zooms.min():  # 2D acquisition: the thick axis is the slice axis
        slice_axis = int(np.argmax(zooms))
    else:  # isotropic: the voxel axis closest to inferior-superior
        slice_axis = int(np.argmax(np.abs(np.asarray(img.affine)[2, :3])))
    tol = 1e-3 * float(np.abs(data).max())
    for ax in (a for a in range(3) if a != slice_axis):
        for end in (0, -1):
            if float(np.abs(np.take(data, end, axis=ax)).max()) > tol:
                return False, "non-zero background at the edge of the slices"
    from ..brain_extraction import brain_fraction

    frac = brain_fraction(img)
    if frac < STRIPPED_BRAIN_FRACTION:
        return False, f"zero background, but deepbet calls only {frac:.2f} of the non-zero voxels brain"
    return True, f"zero background, and deepbet calls {frac:.2f} of the non-zero voxels brain"


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
