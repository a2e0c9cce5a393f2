"""Training slices: volumes -> model geometry, augmentation, batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..preprocessing import normalize, to_model_slices
from .readers import LabelledSlice, LabelledVolume

N_CLASSES = 4


@dataclass
class SliceSet:
    """Training slices in model geometry.

    Attributes
    ----------
    images : ndarray (N, H, W) float32, normalised
    labels : ndarray (N, H, W) uint8, tri-mask 0-3
    annotated : ndarray (N, 4) float32, 1 where the class was annotated
    subjects : ndarray (N,) str
    """

    images: np.ndarray
    labels: np.ndarray
    annotated: np.ndarray
    subjects: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def select(self, keep: np.ndarray) -> "SliceSet":
        return SliceSet(self.images[keep], self.labels[keep], self.annotated[keep], self.subjects[keep])

    @staticmethod
    def concat(sets: list["SliceSet"]) -> "SliceSet":
        sets = [s for s in sets if len(s)]
        return SliceSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in
                          ("images", "labels", "annotated", "subjects")))


def volume_to_slices(vol: LabelledVolume, card_pre: dict) -> SliceSet:
    """Send a labelled volume through the inference preprocessing.

    Parameters
    ----------
    vol : LabelledVolume
    card_pre : dict
        The model card's ``preprocessing`` block (``pixel_size_mm``, ``slice_size``,
        ``normalization``).
    """
    geom, x = to_model_slices(vol.flair, card_pre)
    y = geom.forward(vol.labels, order=0)
    n = len(x)
    return SliceSet(x.astype(np.float32), y.astype(np.uint8),
                    np.tile(np.asarray(vol.annotated, np.float32), (n, 1)),
                    np.array([vol.subject] * n))


def png_slices_to_set(slices: list[LabelledSlice], card_pre: dict) -> SliceSet:
    """Normalise 2D slices the same way (per slice) and pad/crop them to the model size."""
    size = card_pre["slice_size"]
    imgs, labs = [], []
    for s in slices:
        x = normalize(s.image[:, :, None], **card_pre["normalization"])[:, :, 0]
        imgs.append(_centre_fit(x, size))
        labs.append(_centre_fit(s.labels, size))
    return SliceSet(np.stack(imgs).astype(np.float32), np.stack(labs).astype(np.uint8),
                    np.array([s.annotated for s in slices], np.float32),
                    np.array([s.subject for s in slices]))


def _centre_fit(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), a.dtype)
    h, w = a.shape
    sh, sw = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dh, dw = max(0, (size - h) // 2), max(0, (size - w) // 2)
    hh, ww = min(h, size), min(w, size)
    out[dh:dh + hh, dw:dw + ww] = a[sh:sh + hh, sw:sw + ww]
    return out


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, crop: int,
            strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random spatial and intensity augmentation of one slice, with a random crop.

    Spatial (one affine map, so labels stay aligned): left-right flip (p=0.5),
    rotation +-15 deg, isotropic scaling 0.85-1.15, translation +-(H-crop)/2 px.
    Intensity: gamma 0.7-1.5, smooth multiplicative bias field (+-25 %), global
    contrast 0.85-1.15, Gaussian noise (sigma <= 0.04), occasional blur (simulated
    partial volume).

    Parameters
    ----------
    image : ndarray (H, W) float32
    labels : ndarray (H, W) uint8
    rng : numpy Generator
    crop : int
        Output size (square).
    strength : float
        0 gives a plain centre crop.

    Returns
    -------
    (image, labels) : ndarray (crop, crop) float32 and uint8
    """
    h, w = image.shape
    ang = np.deg2rad(rng.uniform(-15, 15)) * strength
    sc = 1.0 + rng.uniform(-0.15, 0.15) * strength
    flip = strength > 0 and rng.random() < 0.5
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) * sc
    if flip:
        rot = rot @ np.diag([-1.0, 1.0])
    max_shift = max(0.0, (min(h, w) - crop) / 2.0 - 8.0)
    shift = rng.uniform(-max_shift, max_shift, 2) * (strength > 0)
    c_in = np.array([(h - 1) / 2.0, (w - 1) / 2.0]) + shift
    c_out = np.array([(crop - 1) / 2.0] * 2)
    offset = c_in - rot @ c_out
    img = ndimage.affine_transform(image, rot, offset=offset, output_shape=(crop, crop), order=1,
                                   mode="constant", cval=0.0)
    lab = ndimage.affine_transform(labels, rot, offset=offset, output_shape=(crop, crop), order=0,
                                   mode="constant", cval=0)
    if strength > 0:
        img = np.clip(img, 0, None)
        img = img ** rng.uniform(0.7, 1.5)
        yy, xx = np.meshgrid(np.linspace(-1, 1, crop), np.linspace(-1, 1, crop), indexing="ij")
        coef = rng.uniform(-0.25, 0.25, 5) * strength
        bias = np.exp(coef[0] * xx + coef[1] * yy + coef[2] * xx * yy + coef[3] * xx**2 + coef[4] * yy**2)
        img = img * bias * rng.uniform(0.85, 1.15)
        if rng.random() < 0.2:
            img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.0))
        img = img + rng.normal(0, rng.uniform(0, 0.04), img.shape)
    return img.astype(np.float32), lab.astype(np.uint8)


def pack_targets(labels: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """One-hot labels + broadcast annotation flags, as the losses expect.

    Parameters
    ----------
    labels : ndarray (N, H, W) uint8
    annotated : ndarray (N, 4) float32

    Returns
    -------
    ndarray (N, H, W, 8) float32
    """
    onehot = np.eye(N_CLASSES, dtype=np.float32)[labels]
    ann = np.broadcast_to(annotated[:, None, None, :], onehot.shape)
    return np.concatenate([onehot, ann], axis=-1)


class SliceSequence:
    """Batches of augmented crops for ``keras.Model.fit`` (a PyDataset).

    Every epoch draws all slices that hold annotated foreground and a random
    ``empty_fraction`` of the others, shuffled. ``oversample`` maps a class index to
    how many times a slice in which that class is annotated *and present* is drawn
    per epoch (class-balanced sampling for a class that few subjects label: normal
    WMH is labelled in 2 of 11 volumes plus 20 PNG slices).
    """

    def __new__(cls, *args, **kwargs):  # build the PyDataset subclass lazily (keras import)
        import keras

        class _Seq(keras.utils.PyDataset):
            def __init__(self, data: SliceSet, batch_size: int, crop: int, seed: int,
                         augment_strength: float = 1.0, empty_fraction: float = 0.3,
                         oversample: dict | None = None):
                super().__init__(workers=1, use_multiprocessing=False)
                self.data, self.batch_size, self.crop = data, batch_size, crop
                self.strength = augment_strength
                self.rng = np.random.default_rng(seed)
                self.fg = np.nonzero((data.labels > 0).reshape(len(data), -1).any(axis=1))[0]
                self.bg = np.setdiff1d(np.arange(len(data)), self.fg)
                self.empty_fraction = empty_fraction
                extra = []
                for c, factor in (oversample or {}).items():
                    has = (data.labels == c).reshape(len(data), -1).any(axis=1) & (data.annotated[:, c] > 0)
                    extra += [np.nonzero(has)[0]] * max(0, int(factor) - 1)
                self.extra = np.concatenate(extra).astype(int) if extra else np.zeros(0, int)
                self.on_epoch_end()

            def on_epoch_end(self):
                nb = int(round(self.empty_fraction * len(self.bg)))
                pick = np.concatenate([self.fg, self.extra, self.rng.choice(self.bg, nb, replace=False)])
                self.order = self.rng.permutation(pick)

            def __len__(self):
                return int(np.ceil(len(self.order) / self.batch_size))

            def __getitem__(self, i):
                idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
                xs, ys = [], []
                for j in idx:
                    x, y = augment(self.data.images[j], self.data.labels[j], self.rng, self.crop, self.strength)
                    xs.append(x)
                    ys.append(y)
                x = np.stack(xs)[..., None]
                return x, pack_targets(np.stack(ys), self.data.annotated[idx])

        return _Seq(*args, **kwargs)
