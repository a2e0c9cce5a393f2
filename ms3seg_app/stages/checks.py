"""Stage 1: read and sanity-check the input FLAIR.

Policy: images with NaN/Inf voxels are **refused** (such voxels mean a broken
conversion; silently masking them would hide it); a 4D image with a single volume is
accepted as 3D. Every refusal names the file and the fix.
"""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from ..exceptions import InputDataError
from ..preprocessing.geometry import inferior_superior_axis, pixdim_disagrees

LOGGER = logging.getLogger("ms3seg.stages")

MIN_VOXEL_MM, MAX_VOXEL_MM = 0.1, 12.0
MAX_DIM = 1024
#: Inferior-superior extent (mm) below which the report warns that the scan cannot hold a brain.
MIN_SI_COVERAGE_MM = 60.0
#: A FLAIR is taken as intensity-normalised (z-scored, WhiteStripe, ...: no zero of signal) when
#: more than this fraction of its voxels lie below ``-NEGATIVE_OF_P99`` times the 99th percentile
#: of its absolute values (:func:`restore_signal_zero`). Measured 2026-12-03 on the 40 development
#: FLAIR, T1w and T2w images (registered with spline interpolation, whose ringing leaves
#: negative values): at most 0.02 % of their voxels; three of the FLAIRs z-scored, 6-9 %
#: (skull-stripped, z-scored within the brain) and 63-66 % (whole head).
NORMALISED_NEGATIVE_FRACTION = 0.01
NEGATIVE_OF_P99 = 0.05


def load_flair(path: Path | str) -> tuple[nib.Nifti1Image, list[str]]:
    """Load and sanity-check a FLAIR; return it with a clean header (float32 data) and QC warnings.

    Parameters
    ----------
    path : path of a NIfTI file

    Returns
    -------
    (Nifti1Image (I, J, K) float32 on the input grid with the input's qform/sform, list of str)
        The image's ``extra["intensity_normalised"]`` says whether its zero was restored.

    Policy: images with NaN/Inf voxels are **refused** (such voxels mean a broken
    conversion; silently masking them would hide it); a 4D image with a single volume
    is accepted as 3D; an intensity-normalised image gets its zero of signal back
    (:func:`restore_signal_zero`, with a QC warning).

    Raises
    ------
    InputDataError
        Unreadable/truncated file, not 3D, constant or all-zero, non-finite voxels,
        implausible voxel size or shape, or no orientation information. The message
        names the file and the fix.
    """
    img, data, warnings = read_volume(path, "FLAIR")
    zooms = nib.affines.voxel_sizes(img.affine)[:3]
    si_axis = inferior_superior_axis(img.affine)
    extent = data.shape[si_axis] * float(zooms[si_axis])
    if extent < MIN_SI_COVERAGE_MM:
        warnings.append(f"the FLAIR covers only {extent:.0f} mm from inferior to superior "
                        f"({data.shape[si_axis]} slices); a whole brain needs about 120 mm, so ICV, volumes "
                        "and lesion counts describe part of the brain only")
    data, note = restore_signal_zero(data, si_axis)
    if note:
        warnings.append(note)
    from ..derivatives import image_like

    out = image_like(data, img, np.float32)
    out.extra["intensity_normalised"] = note is not None  # for the dseg sidecar's IntensityNormalised
    return out, warnings


def read_volume(path: Path | str, modality: str) -> tuple[nib.spatialimages.SpatialImage, np.ndarray, list[str]]:
    """Read one 3D MRI volume (FLAIR, T1w, T2w) and check it can be used; the checks of :func:`load_flair`.

    Parameters
    ----------
    path : path of a NIfTI file
    modality : str
        What the image is (``"FLAIR"``, ``"T1w"``, ``"T2w"``), for the messages.

    Returns
    -------
    (nibabel image as read, ndarray (I, J, K) float32 of its data, list of str QC warnings)

    Raises
    ------
    InputDataError
        Unreadable/truncated file (a broken link included), not 3D, constant, non-finite
        voxels, implausible voxel size or shape, a singular affine, or no orientation
        information. The message names the file and the fix.
    """
    path = Path(path)
    warnings: list[str] = []
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError as exc:
        raise InputDataError(unreadable_input(path, exc)) from exc
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputDataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}). "
                             "The file is truncated or not NIfTI; re-export it (e.g. with dcm2niix).") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"{path}: expected a 3D {modality} volume, got shape {data.shape}. "
                             f"Split multi-volume files and give one 3D {modality} per run.")
    if min(data.shape) < 2 or max(data.shape) > MAX_DIM:
        raise InputDataError(f"{path}: implausible image shape {data.shape} for a brain {modality} "
                             f"(each axis 2..{MAX_DIM} voxels).")
    # voxel sizes of the affine, which places every voxel (resampling, volumes, distances); the
    # header's pixdim may disagree (e.g. sform-only files, where pixdim is not read)
    zooms = nib.affines.voxel_sizes(img.affine)[:3]
    if not np.all(np.isfinite(zooms)) or zooms.min() < MIN_VOXEL_MM or zooms.max() > MAX_VOXEL_MM:
        raise InputDataError(f"{path}: implausible voxel size {tuple(np.round(zooms, 3))} mm "
                             f"(expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm); fix the header's sform/qform.")
    disagrees, pixdim, _ = pixdim_disagrees(img)
    if disagrees:
        warnings.append(f"the header's voxel size (pixdim {tuple(np.round(pixdim, 3))} mm) disagrees with its "
                        f"affine's ({tuple(np.round(zooms, 3))} mm); the affine's was used, as for the orientation")
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
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputDataError(f"{path}: {n} voxels are NaN or Inf. Such voxels mean a broken conversion; "
                             "re-export the image, or replace them with 0 if you know why they are there.")
    # float32 (not float64): half the memory of a large scan; integers convert without overflow
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise InputDataError(f"{path}: voxel values exceed the float32 range; rescale the image "
                             "(e.g. fslmaths in -div 1000 out) and re-run.")
    if data.max() <= data.min():
        raise InputDataError(f"{path}: the image is constant (every voxel {data.min():g}); it holds no MRI data.")
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise InputDataError(f"{path}: the affine is singular; fix the header (qform/sform).")
    return img, data, warnings


def looks_intensity_normalised(data: np.ndarray) -> tuple[bool, float]:
    """Whether a FLAIR's intensities were normalised (z-scored, WhiteStripe: no zero of signal).

    The rule: more than :data:`NORMALISED_NEGATIVE_FRACTION` of the voxels lie below
    ``-NEGATIVE_OF_P99`` times the 99th percentile of ``|data|`` (a scan has none beyond
    interpolation ringing).

    Parameters
    ----------
    data : ndarray, any shape, float32, finite

    Returns
    -------
    (bool, float)
        The verdict, and the fraction of voxels below that level.
    """
    scale = float(np.percentile(np.abs(data), 99.0))
    frac = float(np.count_nonzero(data < -NEGATIVE_OF_P99 * scale)) / data.size
    return scale > 0 and frac > NORMALISED_NEGATIVE_FRACTION, frac


def unreadable_input(path: Path, exc: OSError) -> str:
    """The message for an input file that cannot be opened (e.g. a DataLad or git-annex link whose
    content was not fetched), naming the file and the fix."""
    link = " (a link to content not present: `datalad get` or `git annex get` it)" if path.is_symlink() else ""
    return f"{path}: cannot open the file{link}: {exc.strerror or exc}"


def restore_signal_zero(data: np.ndarray, si_axis: int = 2) -> tuple[np.ndarray, str | None]:
    """An intensity-normalised FLAIR shifted back so that its darkest signal is 0, as in a scan.

    Every later stage takes 0 as no signal: the Otsu head mask, the model's tissue-mode
    anchor (:func:`~ms3seg_app.preprocessing.normalize.normalize` maps 0 to 0), the
    skull-stripped check and ``--skull-strip none`` (voxels above 0). A FLAIR z-scored or
    WhiteStripe-normalised has no such zero: half its brain is below 0, and where it was
    skull-stripped first its background (often 0) lies inside the brain's range. Measured
    2026-12-03 (default model, ``--skull-strip auto``) on three development FLAIRs skull-stripped
    by BET and z-scored within the brain: their tri-mask agreed with that of the unnormalised
    FLAIR by Dice 0.79-0.89 (ventricles), 0.55-0.59 (normal WMH, 2.1-2.4 times too large) and
    0.70-0.92 (abnormal WMH); shifted back, 0.96-1.00 in every class. The same FLAIRs whole-head
    and z-scored gave the scan's tri-mask already (Dice 1.00; the shift keeps >= 0.999).

    An image counts as normalised by :func:`looks_intensity_normalised`. Its background is the value that fills at least 99 %
    of the in-plane edge faces of the volume exactly (the value skull-stripping wrote), if one
    does. The other voxels are shifted so that their 0.5th percentile (the darkest tissue, or
    air of a whole-head image) becomes 0 and clipped below at 0.1 % of their 99th
    percentile, so that they stay above 0; the background becomes 0.

    Parameters
    ----------
    data : ndarray (I, J, K) float32, stored order
        FLAIR intensities, finite.
    si_axis : int
        The stored axis across axial slices (its two faces are not edges of the slices).

    Returns
    -------
    (ndarray (I, J, K) float32, str or None)
        ``data`` itself when it is not normalised, with None; else the shifted copy and a note
        for the QC warnings.
    """
    normalised, frac = looks_intensity_normalised(data)
    if not normalised:
        return data, None
    edges = np.concatenate([np.take(data, end, axis=ax).ravel()
                            for ax in range(3) if ax != si_axis for end in (0, -1)])
    values, counts = np.unique(edges, return_counts=True)
    fill = float(values[np.argmax(counts)]) if counts.max() >= 0.99 * edges.size else None
    tissue = data != fill if fill is not None else np.ones(data.shape, bool)
    floor, top = np.percentile(data[tissue], [0.5, 99.0])
    out = np.where(tissue, np.maximum(data - np.float32(floor), np.float32(1e-3 * (top - floor))),
                   np.float32(0)).astype(np.float32)
    where = (f"its background ({fill:g} at the edges) was set to 0 and its darkest tissue"
             if fill is not None else "its darkest voxels (air)")
    return out, (f"the FLAIR looks intensity-normalised ({frac:.0%} of its voxels below 0): {where} taken as "
                 "no signal; results are less certain than from the scanner's FLAIR, give that if you have it")


