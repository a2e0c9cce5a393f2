"""Stage 2 (optional): N4 bias-field correction of the FLAIR (ANTsPy, Tustison et al. 2010)."""
from __future__ import annotations

import nibabel as nib
import numpy as np


def n4_correct(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """N4-corrected copy of a FLAIR on the same grid.

    Parameters
    ----------
    img : Nifti1Image (I, J, K)

    Returns
    -------
    Nifti1Image (I, J, K) float32, same geometry and header as ``img``.
    """
    import ants

    from ..derivatives import image_like

    corrected = ants.n4_bias_field_correction(ants.from_numpy(np.asarray(img.dataobj, np.float32))).numpy()
    return image_like(corrected, img, np.float32)
