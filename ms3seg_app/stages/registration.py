"""Stage 5: rigid co-registration of T1w/T2w to the FLAIR (FSL FLIRT or ANTsPy)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..exceptions import InputDataError
from .brain import fsl_available


def coregister_to_flair(moving_path: Path, flair: nib.Nifti1Image, method: str = "auto",
                        work_dir: Path | None = None, modality: str = "T1w") -> tuple[nib.Nifti1Image, str]:
    """Rigidly register a T1w/T2w to the FLAIR and resample it onto the FLAIR grid.

    FSL FLIRT (6 dof, mutual information) when FSL is present, else ANTsPy
    (``ants.registration(type_of_transform="Rigid")``, mutual information).

    The anatomical is read and checked first (:func:`~ms3seg_app.stages.checks.read_volume`):
    what is registered is its checked 3D volume.

    Parameters
    ----------
    moving_path : Path of the T1w/T2w NIfTI
    flair : Nifti1Image (I, J, K), the FLAIR as loaded
    method : {"auto", "fsl", "ants"}
    work_dir : Path, optional
        Scratch space.
    modality : str
        ``"T1w"`` or ``"T2w"``, for the messages.

    Returns
    -------
    (Nifti1Image on the FLAIR grid, float32; str method used)

    Raises
    ------
    InputDataError
        The anatomical cannot be used (unreadable, truncated, a broken link, not 3D, ...):
        the message names the file and why.
    """
    from ..derivatives import image_like
    from .checks import read_volume

    moving_path = Path(moving_path)
    moving_img, moving_data, _ = read_volume(moving_path, modality)
    use_fsl = fsl_available() if method == "auto" else method == "fsl"
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        fixed_p = Path(tmp) / "flair.nii.gz"
        nib.save(flair, str(fixed_p))
        moving_p = Path(tmp) / "moving.nii.gz"  # the checked 3D volume (a 4D file of one volume too)
        nib.save(image_like(moving_data, moving_img, np.float32), str(moving_p))
        del moving_data
        if use_fsl:
            from nipype.interfaces import fsl

            out = Path(tmp) / "reg.nii.gz"
            fsl.FLIRT(in_file=str(moving_p), reference=str(fixed_p), dof=6, cost="mutualinfo",
                      out_file=str(out), out_matrix_file=str(Path(tmp) / "reg.mat"),
                      output_type="NIFTI_GZ").run()
            data = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
            used = "fsl-flirt"
        else:
            import ants

            reg = ants_rigid(ants.image_read(str(fixed_p)), ants.image_read(str(moving_p)), Path(tmp))
            out = Path(tmp) / "reg.nii.gz"
            ants.image_write(reg["warpedmovout"], str(out))
            data = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
            used = "antspy-rigid"
    if data.shape != flair.shape:
        raise InputDataError(f"{moving_path}: registered image has shape {data.shape}, FLAIR {flair.shape}")
    return image_like(data, flair, np.float32), used


def ants_rigid(fixed, moving, folder: Path) -> dict:
    """ANTsPy's rigid registration of ``moving`` to ``fixed`` (mutual information, seed 1): the
    one recipe of co-registration and of the group level's session-to-session registration.

    Parameters
    ----------
    fixed, moving : ants.ANTsImage
    folder : Path
        Existing folder for the transform files (``reg["fwdtransforms"]``), which the caller
        removes after use; by default ANTsPy leaves them in the system's temporary folder, one
        per registration.

    Returns
    -------
    dict
        ``ants.registration``'s result (``warpedmovout``, ``fwdtransforms``, ...).
    """
    import ants

    return ants.registration(fixed=fixed, moving=moving, type_of_transform="Rigid", aff_metric="mattes",
                             random_seed=1, verbose=False, outprefix=str(Path(folder) / "rigid_"))
