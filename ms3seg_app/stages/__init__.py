"""Participant-level stages, one module each; every output lies on the input FLAIR's grid.

checks (:func:`load_flair`) -> bias (:func:`n4_correct`, optional) -> brain
(:func:`brain_mask`) -> inference (:mod:`ms3seg_app.model.predict`) -> post-processing
(:mod:`ms3seg_app.trimask`) -> lesion analysis (:mod:`ms3seg_app.lesions`); registration
(:func:`coregister_to_flair`) for T1w/T2w. The chain is run by :mod:`ms3seg_app.participant`.
"""
from .bias import n4_correct
from .brain import brain_mask, fsl_available, restrict_to_brain
from .checks import load_flair
from .registration import coregister_to_flair

__all__ = ["brain_mask", "coregister_to_flair", "fsl_available", "load_flair", "n4_correct", "restrict_to_brain"]
