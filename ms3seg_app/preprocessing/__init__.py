"""Preprocessing shared by training and inference: geometry and intensity."""
from .geometry import SliceGeometry, head_mask, head_threshold
from .normalize import normalize

__all__ = ["SliceGeometry", "head_mask", "head_threshold", "normalize"]
