"""Stage 3: brain extraction (FSL BET when installed, else deepbet; ``none`` for skull-stripped
input, which ``auto`` detects: :func:`looks_skull_stripped`)."""
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
from ..preprocessing.geometry import fill_holes_per_slice, inferior_superior_axis

LOGGER = logging.getLogger("ms3seg.stages")


#: ``--skull-strip auto`` takes a FLAIR as already skull-stripped when deepbet's bounding-box
#: network calls at least this fraction of its voxels above 0 brain (:func:`brain_fraction`).
#: Measured 2026-12-02: the 10 development FLAIRs skull-stripped with FSL BET 0.80-0.95; the same
#: FLAIRs whole-head with the background outside the head set to 0, 0.46-0.55 (slabs of 5 or 10
#: of their slices up to 0.65); synthetic heads with a zero background and a thin skull 0.68-0.69.
STRIPPED_BRAIN_FRACTION = 0.75
#: ... and only when the FLAIR covers at least this much from inferior to superior: on slabs
#: (5-10 of the development FLAIRs' slices) the network's fraction of skull-stripped and of
#: zero-background heads overlap (0.59-0.83 against 0.52-0.65), so slabs go to brain extraction.
STRIPPED_MIN_SI_COVERAGE_MM = 100.0


#: deepbet resamples the whole volume to 128^3 voxels, whatever its size in mm: where a margin of
#: exact zeros (a FLAIR padded onto a larger grid) leaves the non-zero voxels less than this
#: fraction of the volume along an axis, brain extraction runs on the non-zero box plus
#: :data:`PADDING_MARGIN_VOXELS` and the mask is placed back (:func:`brain_mask`). Found by the
#: review of 2026-12-03: a 256x256x20 FLAIR zero-padded to 512x512 (the head 50 % of the
#: grid) kept its mask; padded to 640 or 768 (40, 33 %) deepbet's mask took 1.5 M voxels of
#: padding (ICV 14,493 instead of 1,852 mL).
PADDED_FRACTION = 0.6
PADDING_MARGIN_VOXELS = 8


def fsl_available() -> bool:
    """FSL's ``bet`` and ``flirt`` on the PATH with ``FSLDIR`` set."""
    return bool(shutil.which("bet") and shutil.which("flirt") and os.environ.get("FSLDIR"))


def brain_mask(img: nib.Nifti1Image, method: str = "auto",
               work_dir: Path | None = None) -> tuple[np.ndarray, str, str | None]:
    """Brain mask on the image grid.

    Parameters
    ----------
    img : Nifti1Image, 3D
    method : {"auto", "fsl", "deepbet", "none"}
        ``none``: the input is already skull-stripped; the mask is its voxels above 0
        (holes filled per slice; :func:`~ms3seg_app.stages.load_flair` gives an
        intensity-normalised FLAIR its zero back first). ``auto``: ``none`` when :func:`looks_skull_stripped`,
        else FSL BET if installed, else deepbet.

    Returns
    -------
    (ndarray (I, J, K) bool, str, str or None)
        The mask, the method used (``"none"``, ``"fsl"`` or ``"deepbet"``), and for an input
        that ``auto`` took as already skull-stripped a note for the QC warnings (what was
        found, what to check, how to override), else None.

    Raises
    ------
    InputDataError
        ``fsl`` requested without FSL, or an empty mask.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    box = _unpadded_box(data)
    if box is not None:
        LOGGER.debug("%s: zero-padded; brain extraction on the voxels %s", img.get_filename() or "FLAIR", box)
        inner, method, note = brain_mask(img.slicer[box], method, work_dir)
        mask = np.zeros(img.shape[:3], bool)
        mask[box] = inner
        return mask, method, note
    note = stage = None
    if method == "auto":
        stripped, why, stage = _skull_stripped_evidence(img, data)
        LOGGER.debug("%s: skull-stripped input? %s (%s)", img.get_filename() or "FLAIR", stripped, why)
        if stripped:
            method = "none"
            note = (f"taken as already skull-stripped ({why}): its voxels above 0 are the brain mask; check "
                    "the brain-mask contour, and re-run with --skull-strip deepbet if skull or scalp is "
                    "inside it (--skull-strip none skips this check)")
        else:
            method = "fsl" if fsl_available() else "deepbet"
    if method != "deepbet":
        stage = None  # deepbet's first stage (a float32 copy of the volume) is only for deepbet
    if method == "none":
        mask = fill_holes_per_slice(data > 0, inferior_superior_axis(img.affine))
    elif method == "fsl":
        if not fsl_available():
            raise InputDataError("--skull-strip fsl asked for FSL, but bet/flirt or FSLDIR are missing; "
                                 "install FSL or use --skull-strip deepbet")
        mask = _bet_fsl(img, work_dir)
    elif method == "deepbet":
        mask = _bet_deepbet(img, stage)
    else:
        raise ValueError(f"unknown skull-strip method {method!r}")
    if not mask.any():
        raise InputDataError(f"brain extraction ({method}) returned an empty mask; try --skull-strip none "
                             "for skull-stripped inputs")
    return mask, method, note


def _unpadded_box(data: np.ndarray) -> tuple[slice, ...] | None:
    """The box of ``data``'s non-zero voxels plus :data:`PADDING_MARGIN_VOXELS`, where a margin of
    exact zeros leaves it under :data:`PADDED_FRACTION` of the grid along some axis; else None."""
    nonzero = data != 0
    box = []
    for ax in range(3):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != ax)))
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - PADDING_MARGIN_VOXELS),
                         min(data.shape[ax], int(hit[-1]) + 1 + PADDING_MARGIN_VOXELS)))
    if all(b.stop - b.start >= PADDED_FRACTION * n for b, n in zip(box, data.shape)):
        return None
    return tuple(box)


def looks_skull_stripped(img: nib.Nifti1Image, data: np.ndarray | None = None) -> tuple[bool, str]:
    """Whether a FLAIR is already skull-stripped, and the evidence, in words.

    Three tests, the cheap ones first:

    1. the FLAIR covers at least :data:`STRIPPED_MIN_SI_COVERAGE_MM` from inferior to superior
       (on thinner slabs test 3 cannot tell);
    2. the background at the edges of the slices is zero: every voxel on the four faces of the
       volume along the in-plane axes is 0 (to 0.1 % of the image maximum). After smriprep's
       ``_is_skull_stripped`` (fMRIPrep ``--skull-strip-t1w auto``), which tests all six faces;
       the top and bottom slices of a 2D FLAIR hold brain even when it is skull-stripped,
       so only the in-plane faces count. A raw head scan fails here (noise is not 0);
    3. deepbet's bounding-box network calls at least :data:`STRIPPED_BRAIN_FRACTION` of the
       voxels above 0 brain (:func:`~ms3seg_app.brain_extraction.brain_fraction`): a head
       whose background was set to 0 (defaced or registered images) fails here.

    A FLAIR that fails any test goes to brain extraction (FSL BET or deepbet): the safe side.

    Parameters
    ----------
    img : Nifti1Image, 3D
    data : ndarray (I, J, K) float32, optional
        ``img``'s data, if already read.

    Returns
    -------
    (bool, str)
    """
    stripped, why, _ = _skull_stripped_evidence(img, data)
    return stripped, why


def _skull_stripped_evidence(img: nib.Nifti1Image, data: np.ndarray | None = None):
    """:func:`looks_skull_stripped`, and deepbet's first stage when test 3 ran it (else None),
    so that brain extraction does not run the bounding-box network a second time."""
    from ..brain_extraction import box_stage, brain_fraction, finite
    data = finite(np.asarray(img.dataobj, dtype=np.float32) if data is None else data)
    zooms = nib.affines.voxel_sizes(img.affine)[:3]
    si = inferior_superior_axis(img.affine)
    extent = data.shape[si] * float(zooms[si])
    if extent < STRIPPED_MIN_SI_COVERAGE_MM:
        return False, f"covers {extent:.0f} mm from inferior to superior, too little to tell", None
    # 2D acquisition: the thick axis is the slice axis; isotropic: the inferior-superior one
    slice_axis = int(np.argmax(zooms)) if zooms.max() > 1.5 * zooms.min() else si
    tol = 1e-3 * float(np.abs(data).max())
    for ax in (a for a in range(3) if a != slice_axis):
        for end in (0, -1):
            if float(np.abs(np.take(data, end, axis=ax)).max()) > tol:
                return False, "non-zero background at the edge of the slices", None
    stage = box_stage(img)
    frac = brain_fraction(img, stage)
    if frac < STRIPPED_BRAIN_FRACTION:
        return False, f"zero background, but deepbet calls only {frac:.2f} of the voxels above 0 brain", stage
    return True, f"zero background, and deepbet calls {frac:.2f} of the voxels above 0 brain", stage


def _bet_deepbet(img: nib.Nifti1Image, stage=None) -> np.ndarray:
    """deepbet's networks (Fisch et al. 2024) in Keras: no PyTorch (:mod:`ms3seg_app.brain_extraction`);
    ``stage``: its first stage for ``img``, if the skull-stripped check already ran it."""
    from ..brain_extraction import deepbet_mask

    mask = deepbet_mask(img, stage=stage)
    if mask.shape != img.shape:
        raise InputDataError(f"deepbet returned a mask of shape {mask.shape} for an image of {img.shape}")
    # deepbet resamples to 256^3 and back by nearest neighbour; fill the axial slices' holes left by it
    return fill_holes_per_slice(mask, inferior_superior_axis(img.affine))


def _bet_fsl(img: nib.Nifti1Image, work_dir: Path | None) -> np.ndarray:
    from nipype.interfaces import fsl

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        src = Path(tmp) / "flair.nii.gz"
        nib.save(img, str(src))
        res = fsl.BET(in_file=str(src), mask=True, frac=0.5, robust=True, output_type="NIFTI_GZ",
                      out_file=str(Path(tmp) / "brain.nii.gz")).run()
        return np.asanyarray(nib.load(res.outputs.mask_file).dataobj) > 0


def restrict_to_brain(mask: np.ndarray, spacing, axis: int = 2) -> np.ndarray:
    """Brain mask dilated by ~2 mm within each axial slice: the region where findings are kept.

    Parameters
    ----------
    mask : ndarray (I, J, K) bool, stored order
    spacing : 3 floats, voxel size in mm along I, J, K
    axis : int
        The stored axis across axial slices (:func:`~ms3seg_app.preprocessing.geometry.inferior_superior_axis`
        of the image's affine): the dilation stays within the plane of the other two, so the
        result does not depend on the storage order.

    Returns
    -------
    ndarray (I, J, K) bool
    """
    inplane = [float(spacing[a]) for a in range(3) if a != axis]
    iters = max(1, int(round(2.0 / max(min(inplane), 0.1))))
    st = np.ones((3, 3, 3), bool)
    st[(slice(None),) * axis + (0,)] = False
    st[(slice(None),) * axis + (2,)] = False
    return ndimage.binary_dilation(mask, st, iterations=iters)
