"""Participant pipeline stages: image checks, brain extraction, co-registration.

Each stage takes images (or paths) and returns images on the FLAIR's own grid; the
geometry of every output is the input FLAIR's (shape, affine, qform/sform codes).
FSL is optional: BET/FLIRT are used through nipype when ``bet``/``flirt`` are on the
PATH, otherwise deepbet (brain extraction, weights inside its wheel) and ANTsPy
(rigid registration) do the same jobs.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .exceptions import InputDataError
from .preprocessing import head_mask

LOGGER = logging.getLogger("ms3seg.stages")

MIN_VOXEL_MM, MAX_VOXEL_MM = 0.1, 12.0
MAX_DIM = 1024


def load_flair(path: Path | str) -> tuple[nib.Nifti1Image, list[str]]:
    """Load and sanity-check a FLAIR; return the image (float32 data) and QC warnings.

    Policy: images with NaN/Inf voxels are **refused** (such voxels mean a broken
    conversion; silently masking them would hide it); a 4D image with a single volume
    is accepted as 3D.

    Raises
    ------
    InputDataError
        Unreadable/truncated file, not 3D, constant or all-zero, non-finite voxels,
        implausible voxel size or shape, or no orientation information. The message
        names the file and the fix.
    """
    path = Path(path)
    warnings: list[str] = []
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputDataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}). "
                             "The file is truncated or not NIfTI; re-export it (e.g. with dcm2niix).") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"{path}: expected a 3D FLAIR volume, got shape {data.shape}. "
                             "Split multi-volume files and give one 3D FLAIR per run.")
    if min(data.shape) < 2 or max(data.shape) > MAX_DIM:
        raise InputDataError(f"{path}: implausible image shape {data.shape} for a brain FLAIR "
                             f"(each axis 2..{MAX_DIM} voxels).")
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if not np.all(np.isfinite(zooms)) or zooms.min() < MIN_VOXEL_MM or zooms.max() > MAX_VOXEL_MM:
        raise InputDataError(f"{path}: implausible voxel size {tuple(np.round(zooms, 3))} mm "
                             f"(expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm); fix the header's pixdim.")
    if isinstance(img, nib.Nifti1Image):
        qcode = int(img.header["qform_code"])
        scode = int(img.header["sform_code"])
        if qcode == 0 and scode == 0:
            raise InputDataError(f"{path}: neither qform nor sform is set, so the orientation of the "
                                 "image is unknown. Re-convert from DICOM (dcm2niix) or set the sform.")
        if qcode and scode:
            q, s = img.get_qform(), img.get_sform()
            if not np.allclose(q, s, atol=1e-2):
                warnings.append("qform and sform disagree; the sform was used (nibabel's rule)")
    if not np.issubdtype(data.dtype, np.number):
        raise InputDataError(f"{path}: voxel type {data.dtype} is not numeric")
    data = np.asarray(data, dtype=np.float64)  # no integer overflow in later arithmetic
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputDataError(f"{path}: {n} voxels are NaN or Inf. Such voxels mean a broken conversion; "
                             "re-export the image, or replace them with 0 if you know why they are there.")
    if data.max() <= data.min():
        raise InputDataError(f"{path}: the image is constant (every voxel {data.min():g}); it holds no MRI data.")
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise InputDataError(f"{path}: the affine is singular; fix the header (qform/sform).")
    hdr = img.header.copy() if isinstance(img, nib.Nifti1Image) else None
    out = nib.Nifti1Image(data.astype(np.float32), img.affine, hdr)
    if isinstance(img, nib.Nifti1Image):
        out.set_qform(img.get_qform(), int(img.header["qform_code"]) or 1)
        out.set_sform(img.affine, int(img.header["sform_code"]) or 1)
    out.header.set_data_dtype(np.float32)
    return out, warnings


def fsl_available() -> bool:
    """FSL's ``bet`` and ``flirt`` on the PATH with ``FSLDIR`` set."""
    import os

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


_DEEPBET = None


def _bet_deepbet(img: nib.Nifti1Image) -> np.ndarray:
    global _DEEPBET
    import torch
    from deepbet.bet import BrainExtraction

    if _DEEPBET is None:
        _DEEPBET = BrainExtraction(no_gpu=not torch.cuda.is_available())
    _, mask_img, _ = _DEEPBET.run(img)
    mask = np.asanyarray(mask_img.dataobj) > 0
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


def coregister_to_flair(moving_path: Path, flair: nib.Nifti1Image, method: str = "auto",
                        work_dir: Path | None = None) -> tuple[nib.Nifti1Image, str]:
    """Rigidly register a T1w/T2w to the FLAIR and resample it onto the FLAIR grid.

    FSL FLIRT (6 dof, mutual information) when FSL is present, else ANTsPy
    (``ants.registration(type_of_transform="Rigid")``, mutual information).

    Returns
    -------
    (Nifti1Image on the FLAIR grid, float32; str method used)
    """
    moving_path = Path(moving_path)
    use_fsl = fsl_available() if method == "auto" else method == "fsl"
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        fixed_p = Path(tmp) / "flair.nii.gz"
        nib.save(flair, str(fixed_p))
        if use_fsl:
            from nipype.interfaces import fsl

            out = Path(tmp) / "reg.nii.gz"
            fsl.FLIRT(in_file=str(moving_path), reference=str(fixed_p), dof=6, cost="mutualinfo",
                      out_file=str(out), out_matrix_file=str(Path(tmp) / "reg.mat"),
                      output_type="NIFTI_GZ").run()
            data = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
            used = "fsl-flirt"
        else:
            import ants

            fixed = ants.image_read(str(fixed_p))
            moving = ants.image_read(str(moving_path))
            reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="Rigid",
                                    aff_metric="mattes", random_seed=1, verbose=False)
            out = Path(tmp) / "reg.nii.gz"
            ants.image_write(reg["warpedmovout"], str(out))
            data = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
            used = "antspy-rigid"
    if data.shape != flair.shape:
        raise InputDataError(f"{moving_path}: registered image has shape {data.shape}, FLAIR {flair.shape}")
    from .derivatives import image_like

    return image_like(data, flair, np.float32), used


def restrict_to_brain(mask: np.ndarray, spacing) -> np.ndarray:
    """Brain mask dilated by ~2 mm in-plane: the region where findings are kept."""
    iters = max(1, int(round(2.0 / max(min(spacing[:2]), 0.1))))
    st = np.zeros((3, 3, 1), bool)
    st[:, :, 0] = True
    return ndimage.binary_dilation(mask, st, iterations=iters)


def head_fraction(img: nib.Nifti1Image) -> float:
    """Share of voxels in the head mask (QC of skull-stripped vs whole-head input)."""
    return float(head_mask(np.asarray(img.dataobj, np.float32)).mean())
