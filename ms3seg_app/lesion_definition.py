"""The one definition of a lesion, shared by every part of ms3seg-app.

A lesion is a connected component of the abnormal-WMH class with 26-connectivity
(face, edge or corner neighbours in 3D) and a volume of at least 3 mm³ (Anima's lesion
analyser; MSSEG-1 scoring, Commowick et al., Sci Rep 2018, uses a minimum size too).
The per-lesion table, the burden counts, longitudinal new/enlarging lesions, the
evaluation metrics (LTPR, LFPR, lesion-wise F1) and the cross-validation figures in the
model card all call :data:`LESION`, so the lesion F1 in the card and the lesion counts
a user sees are the same quantity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .distance import label_counts


@dataclass(frozen=True)
class LesionDefinition:
    """Connectivity and minimum size of a lesion.

    Attributes
    ----------
    connectivity : {6, 18, 26}
        3D neighbourhood joining voxels into one lesion.
    min_volume_mm3 : float
        Components smaller than this (mm³) are not lesions.
    """

    connectivity: int = 26
    min_volume_mm3: float = 3.0

    def structure(self) -> np.ndarray:
        """(3, 3, 3) bool structuring element of :attr:`connectivity` for ``scipy.ndimage.label``."""
        rank = {6: 1, 18: 2, 26: 3}[self.connectivity]
        return ndimage.generate_binary_structure(3, rank)

    def min_voxels(self, voxel_mm3: float) -> int:
        """Smallest lesion in voxels of ``voxel_mm3`` mm³: ``ceil(min_volume_mm3 / voxel_mm3)``, >= 1."""
        if voxel_mm3 <= 0:
            raise ValueError(f"voxel volume must be positive, got {voxel_mm3}")
        return max(1, math.ceil(self.min_volume_mm3 / voxel_mm3 - 1e-9))

    def label(self, mask: np.ndarray, voxel_mm3: float) -> tuple[np.ndarray, int]:
        """Lesions of a binary mask, numbered 1..n consecutively.

        Parameters
        ----------
        mask : ndarray (I, J, K) bool
            Abnormal-WMH voxels.
        voxel_mm3 : float
            Volume of one voxel (mm³).

        Returns
        -------
        (labels, n) : ndarray (I, J, K) int32 (0 outside lesions), and the lesion count.
        """
        st = self.structure()
        lab, n = ndimage.label(np.asarray(mask, bool), structure=st)
        keep_min = self.min_voxels(voxel_mm3)
        if n and keep_min > 1:
            sizes = label_counts(lab)  # no int64 copy of the volume
            small = sizes < keep_min
            small[0] = False
            if small.any():
                lab[small[lab]] = 0
                lab, n = ndimage.label(lab > 0, structure=st)
        return lab.astype(np.int32, copy=False), int(n)

    def to_dict(self) -> dict:
        """``{"connectivity": 26, "min_volume_mm3": 3.0}`` for sidecars and model cards."""
        return asdict(self)


#: The lesion definition used everywhere.
LESION = LesionDefinition()
