"""Inference: FLAIR image in, per-class probabilities on the FLAIR's own grid out."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..preprocessing import SliceGeometry, to_model_slices
from .card import load_model

LOGGER = logging.getLogger("ms3seg.inference")


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict_image`.

    Attributes
    ----------
    probabilities : ndarray (I, J, K, 4) float32
        Per-class probabilities on the input voxel grid (stored order), summing to 1.
    dseg : ndarray (I, J, K) uint8
        Tri-mask 0-3: argmax, then the card's post-processing (normal WMH kept only
        near the ventricles, :mod:`ms3seg_app.trimask`).
    geometry : SliceGeometry
    """

    probabilities: np.ndarray
    dseg: np.ndarray
    geometry: SliceGeometry


class Predictor:
    """Load a model once, predict many volumes (after nnU-Net's ``nnUNetPredictor``).

    Parameters
    ----------
    weights : path, optional
        Model file; default bundled weights (see :func:`~ms3seg_app.model.card.resolve_weights`).
    allow_unverified : bool
        Accept weights whose sha256 differs from the card.
    tta : bool
        Average with the left-right flipped prediction (test-time augmentation).
    batch_size : int
        Slices per forward pass.
    """

    def __init__(self, weights=None, allow_unverified: bool = False, tta: bool = True, batch_size: int = 8,
                 _loaded=None):
        if _loaded is None:
            _loaded = load_model(weights, allow_unverified)
        self.model, self.card, self.weights = _loaded
        self.pre = self.card["preprocessing"]
        self.tta = tta
        self.batch_size = batch_size

    @classmethod
    def from_model(cls, model, card: dict, tta: bool = True, batch_size: int = 8) -> "Predictor":
        """Wrap an in-memory model and its card (training and cross-validation)."""
        return cls(tta=tta, batch_size=batch_size, _loaded=(model, card, None))

    @property
    def sha256(self) -> str:
        return self.card["sha256"]

    def predict_slices(self, x: np.ndarray) -> np.ndarray:
        """Predict preprocessed slices.

        Parameters
        ----------
        x : ndarray (Z, H, W) float32, normalised, model geometry

        Returns
        -------
        ndarray (Z, H, W, 4) float32 softmax probabilities
        """
        inp = x[..., None].astype(np.float32)
        p = self.model.predict(inp, batch_size=self.batch_size, verbose=0)
        if self.tta:
            pf = self.model.predict(inp[:, ::-1], batch_size=self.batch_size, verbose=0)[:, ::-1]
            p = 0.5 * (p + pf)
        return p.astype(np.float32)

    def predict_image(self, img: nib.spatialimages.SpatialImage, mask: np.ndarray | None = None) -> Prediction:
        """Segment a 3D FLAIR.

        Parameters
        ----------
        img : nibabel image, 3D, any storage order
            FLAIR (whole head or skull-stripped).
        mask : ndarray (I, J, K) bool, stored order, optional
            Brain mask; predictions outside it are set to background.

        Returns
        -------
        Prediction on the input voxel grid.
        """
        geom, x = to_model_slices(img, self.pre)
        p = self.predict_slices(x)
        n = p.shape[-1]
        probs = geom.inverse(p, order=1, cval=[1.0] + [0.0] * (n - 1))
        probs = np.clip(probs, 0.0, 1.0)
        probs /= np.maximum(probs.sum(axis=-1, keepdims=True), 1e-6)
        if mask is not None:
            outside = ~np.asarray(mask, bool)
            probs[outside] = 0.0
            probs[outside, 0] = 1.0
        post = self.card.get("postprocessing", {})
        if post.get("nwmh_max_ventricle_distance_mm") is not None:
            from ..trimask import enforce_periventricular_nwmh

            spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
            dseg = enforce_periventricular_nwmh(probs, spacing, post["nwmh_max_ventricle_distance_mm"])
        else:
            dseg = np.argmax(probs, axis=-1).astype(np.uint8)
        return Prediction(probs.astype(np.float32), dseg, geom)


_PREDICTORS: dict = {}


def get_predictor(weights=None, allow_unverified: bool = False, tta: bool = True) -> Predictor:
    """A :class:`Predictor` loaded once per process and reused (nipype nodes, many FLAIRs)."""
    key = (str(weights) if weights else None, bool(allow_unverified), bool(tta))
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor(weights, allow_unverified=allow_unverified, tta=tta)
    return _PREDICTORS[key]
