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
#: more than this fraction of its voxels (other than a constant background) lie below
#: ``-NEGATIVE_OF_P99`` times the 99th percentile of their absolute values
#: (:func:`looks_intensity_normalised`). Measured 2026-12-03 on the 40 development FLAIR, T1w
#: and T2w images (registered with spline interpolation, whose ringing leaves negative values):
#: none of their voxels; three of the FLAIRs z-scored, 19-22 % (skull-stripped, z-scored within
#: the brain) and 5-18 % (whole head). The zero-mean noise in the air of a real-valued
#: reconstruction reaches it only at a standard deviation of ~8 % of that percentile.
NORMALISED_NEGATIVE_FRACTION = 0.01
NEGATIVE_OF_P99 = 0.2


def load_flair(path: Path | str) -> tuple[nib.Nifti1Image, list[str]]:
    """Load and sanity-check a FLAIR; return it with a clean header (float32 data) and QC warnings.

    Parameters
    ----------
    path : path of a NIfTI file

    Returns
    -------
    (Nifti1Image (I, J, K) float32 on the input grid with the input's qform/sform, list of str)
        The image's ``extra["signal_zero_restored"]`` says whether :func:`restore_signal_zero`
        changed its intensities.

    Policy: images with NaN/Inf voxels are **refused** (such voxels mean a broken
    conversion; silently masking them would hide it); a 4D image with a single volume
    is accepted as 3D; an intensity-normalised image, or one with a negative background
    value, gets its zero of signal back (:func:`restore_signal_zero`, with a QC warning).

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
    data, note = restore_signal_zero(data)
    if note:
        warnings.append(note)
    from ..derivatives import image_like

    out = image_like(data, img, np.float32)
    out.extra["signal_zero_restored"] = note is not None  # for the dseg sidecar's SignalZeroRestored
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
    ``-NEGATIVE_OF_P99`` times the 99th percentile of ``|data|`` (a scan has none: neither
    interpolation ringing nor the zero-mean noise of a real-valued reconstruction reach so far).

    Parameters
    ----------
    data : ndarray, any shape, float32, finite
        The voxels to judge (:func:`restore_signal_zero` gives those outside a constant
        background).

    Returns
    -------
    (bool, float)
        The verdict, and the fraction of voxels below that level.
    """
    if data.size == 0:
        return False, 0.0
    scale = float(np.percentile(np.abs(data), 99.0))
    frac = float(np.count_nonzero(data < -NEGATIVE_OF_P99 * scale)) / data.size
    return scale > 0 and frac > NORMALISED_NEGATIVE_FRACTION, frac


def unreadable_input(path: Path, exc: OSError) -> str:
    """The message for an input file that cannot be opened, naming the file and the fix.

    Parameters
    ----------
    path : Path
        The input (FLAIR, T1w, T2w) as the dataset names it.
    exc : OSError
        What opening it raised.

    Returns
    -------
    str
        One line; for a link whose target is missing (a DataLad or git-annex dataset whose
        content was not fetched) it says to ``datalad get`` it.
    """
    link = " (a link to content not present: `datalad get` or `git annex get` it)" if path.is_symlink() else ""
    return f"{path}: cannot open the file{link}: {exc.strerror or exc}"


def background_value(data: np.ndarray) -> float | None:
    """The constant a skull-stripping or a reslicing wrote outside the head or the field of view.

    The most frequent value on the six faces of the volume, if it fills at least
    :data:`NORMALISED_NEGATIVE_FRACTION` of all voxels exactly; else None (a whole-head scan's
    air is noise, not one value).

    Parameters
    ----------
    data : ndarray (I, J, K) float32

    Returns
    -------
    float or None
    """
    faces = np.concatenate([np.take(data, end, axis=ax).ravel() for ax in range(3) for end in (0, -1)])
    values, counts = np.unique(faces, return_counts=True)
    value = values[np.argmax(counts)]
    return float(value) if np.count_nonzero(data == value) >= NORMALISED_NEGATIVE_FRACTION * data.size else None


def restore_signal_zero(data: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A FLAIR whose intensities have no zero of signal, given one back: 0 is no signal, as in a scan.

    Every later stage takes 0 as no signal: the Otsu head mask, the model's tissue-mode
    anchor (:func:`~ms3seg_app.preprocessing.normalize.normalize` maps its lowest value, at
    most 0, to 0), the skull-stripped check and ``--skull-strip none`` (voxels above 0). Two
    kinds of input break that:

    - an intensity-normalised FLAIR (z-scored, WhiteStripe; :func:`looks_intensity_normalised`
      of its voxels other than the :func:`background_value`): half its brain is below 0, and
      where it was skull-stripped first its background (often 0) lies inside the brain's
      range. Its background becomes 0 and its other voxels are shifted so that their 0.5th
      percentile (the darkest tissue, or the air of a whole-head image) is 0, clipped below at
      0.1 % of their 99th percentile so that they stay above 0. Measured 2026-12-03 (default
      model, ``--skull-strip auto``) on three development FLAIRs skull-stripped by BET and
      z-scored within the brain: their tri-mask agreed with that of the unnormalised FLAIR by
      Dice 0.79-0.89 (ventricles), 0.55-0.59 (normal WMH, 2.1-2.4 times too large) and
      0.70-0.92 (abnormal WMH); shifted back, 0.96-1.00 in every class. The same FLAIRs
      whole-head and z-scored gave the scan's tri-mask already (Dice 1.00; shifted, >= 0.999);
    - a scan with a negative background value (e.g. -1000 outside the field of view after a
      reslice): that value becomes 0, the rest is left as it is.

    The judgement is made on every second voxel along each axis (no copy of a large scan).

    Parameters
    ----------
    data : ndarray (I, J, K) float32, stored order
        FLAIR intensities, finite.

    Returns
    -------
    (ndarray (I, J, K) float32, str or None)
        ``data`` itself where neither applies, with None; else the new array and a note for
        the QC warnings.
    """
    fill = background_value(data)
    sample = data[::2, ::2, ::2]
    normalised, frac = looks_intensity_normalised(sample[sample != fill] if fill is not None else sample)
    if not normalised:
        if fill is None or fill >= 0:
            return data, None
        out = np.where(data != np.float32(fill), data, np.float32(0)).astype(np.float32)
        share = float(np.count_nonzero(out != data)) / data.size
        return out, (f"its background value {fill:g} ({share:.0%} of the voxels, e.g. outside the field of view) "
                     "was set to 0, as no signal")
    tissue = data != np.float32(fill) if fill is not None else None
    values = data[tissue] if tissue is not None else data
    floor, top = np.percentile(values, [0.5, 99.0])
    del values
    out = np.maximum(data - np.float32(floor), np.float32(1e-3 * (top - floor))).astype(np.float32)
    if tissue is not None:
        out[~tissue] = 0
    where = (f"its background ({fill:g}) was set to 0 and its darkest tissue" if fill is not None
             else "its darkest voxels (air)")
    return out, (f"the FLAIR looks intensity-normalised ({frac:.0%} of its voxels far below 0): {where} taken as "
                 "no signal; results are less certain than from the scanner's FLAIR, give that if you have it")
