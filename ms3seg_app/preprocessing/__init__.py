"""Preprocessing shared by training and inference: geometry and intensity."""
from .geometry import SliceGeometry, head_mask, head_threshold
from .normalize import normalize
from .slices import to_model_slices

__all__ = ["SliceGeometry", "head_mask", "head_threshold", "normalize", "to_model_slices"]
