"""Training slices: volumes -> model geometry, augmentation, batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..preprocessing import head_mask, normalize, to_model_slices
from ..preprocessing.geometry import inferior_superior_axis
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
    sources : ndarray (N,) str
        Site or dataset of each slice (``ms3seg`` for the home scanner; external
        sources are held out whole in leave-one-source-out validation).
    brain : ndarray (N, H, W) bool
        Brain mask used to simulate skull-stripped input during augmentation (BET
        masks where the data has them, else the head mask eroded by
        :data:`SKULL_MM`; the whole foreground for data already skull-stripped).
    """

    images: np.ndarray
    labels: np.ndarray
    annotated: np.ndarray
    subjects: np.ndarray
    sources: np.ndarray
    brain: np.ndarray

    FIELDS = ("images", "labels", "annotated", "subjects", "sources", "brain")

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concat(sets: list["SliceSet"]) -> "SliceSet":
        sets = [s for s in sets if len(s)]
        return SliceSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in SliceSet.FIELDS))


#: Scalp plus skull thickness (mm) removed from the head mask to approximate the brain
#: where no brain mask exists (skull-strip simulation only; never used at inference).
SKULL_MM = 10.0


def approximate_brain(head: np.ndarray, pixel_mm: float = 1.0) -> np.ndarray:
    """Brain mask approximated by eroding a head mask in-plane by :data:`SKULL_MM`.

    Parameters
    ----------
    head : ndarray (..., H, W) bool
        Head mask(s); the last two axes are the slice plane.
    pixel_mm : float
        In-plane pixel size in mm.

    Returns
    -------
    ndarray, shape of ``head``, bool
    """
    it = max(1, int(round(SKULL_MM / pixel_mm)))
    st = np.zeros((3,) * head.ndim, bool)
    st[(1,) * (head.ndim - 2) + (slice(None), slice(None))] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(head, st, iterations=it, border_value=0)


def volume_to_slices(vol: LabelledVolume, card_pre: dict) -> SliceSet:
    """Send a labelled volume through the inference preprocessing.

    Parameters
    ----------
    vol : LabelledVolume
        ``vol.extra["brain_mask"]`` (a path on the FLAIR grid), when present, gives the
        brain for skull-strip simulation.
    card_pre : dict
        The model card's ``preprocessing`` block (``pixel_size_mm``, ``slice_size``,
        ``normalization``).

    Returns
    -------
    SliceSet of Z axial slices (Z, slice_size, slice_size), source ``ms3seg``.
    """
    import nibabel as nib

    geom, x = to_model_slices(vol.flair, card_pre)
    y = geom.forward(vol.labels, order=0)
    bpath = vol.extra.get("brain_mask")
    if bpath:
        brain = geom.forward((np.asanyarray(nib.load(str(bpath)).dataobj) > 0.5).astype(np.uint8), order=0) > 0
    else:
        head = head_mask(np.asarray(vol.flair.dataobj, np.float32), inferior_superior_axis(vol.flair.affine))
        brain = approximate_brain(geom.forward(head.astype(np.uint8), order=0) > 0, card_pre["pixel_size_mm"])
    n = len(x)
    return SliceSet(x.astype(np.float32), y.astype(np.uint8),
                    np.tile(np.asarray(vol.annotated, np.float32), (n, 1)),
                    np.array([vol.subject] * n), np.array(["ms3seg"] * n), brain.astype(bool))


def png_slices_to_set(slices: list[LabelledSlice], card_pre: dict, skull_stripped: bool = False) -> SliceSet:
    """Normalise 2D slices the same way (per slice) and pad/crop them to the model size.

    Parameters
    ----------
    slices : list of LabelledSlice (or SourcedSlice), images (H, W) at ~1 mm pixels
    card_pre : dict
        The card's ``preprocessing`` block.
    skull_stripped : bool
        The slices are already skull-stripped: their foreground is the brain.

    Returns
    -------
    SliceSet (N, slice_size, slice_size); sources from ``SourcedSlice.source`` or ``ms3seg``.
    """
    size = card_pre["slice_size"]
    imgs, labs, brains = [], [], []
    for s in slices:
        head = head_mask(s.image[:, :, None].astype(np.float32))[:, :, 0]
        x = normalize(s.image, **card_pre["normalization"], mask=head)
        brain = head if skull_stripped else approximate_brain(head, card_pre["pixel_size_mm"])
        imgs.append(_centre_fit(x, size))
        labs.append(_centre_fit(s.labels, size))
        brains.append(_centre_fit(brain, size))
    return SliceSet(np.stack(imgs).astype(np.float32), np.stack(labs).astype(np.uint8),
                    np.array([s.annotated for s in slices], np.float32),
                    np.array([s.subject for s in slices]),
                    np.array([getattr(s, "source", "") or "ms3seg" for s in slices]),
                    np.stack(brains).astype(bool))


def _centre_fit(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), a.dtype)
    h, w = a.shape
    sh, sw = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dh, dw = max(0, (size - h) // 2), max(0, (size - w) // 2)
    hh, ww = min(h, size), min(w, size)
    out[dh:dh + hh, dw:dw + ww] = a[sh:sh + hh, sw:sw + ww]
    return out


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, crop: int,
            strength: float = 1.0, brain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Domain-randomised spatial and intensity augmentation of one slice, with a random crop.

    After SynthSeg's idea (Billot et al., MedIA 2023) of training on a wider range of
    appearances than any one scanner gives, within what a FLAIR can look like:

    - spatial (one affine map for image, labels and brain mask, so they stay aligned):
      left-right flip (p=0.5), rotation +-15 deg, isotropic scaling 0.85-1.15,
      translation +-(H-crop)/2 px;
    - skull stripped (p=0.3, where ``brain`` is given): voxels outside the brain set to 0;
    - resolution (p=0.3): anisotropic in-plane Gaussian blur (sigma 0.5-2 px along one
      random axis, thick-slice or low-matrix partial volume), and (p=0.15) down- and
      up-sampling by 1.5-3 along one axis;
    - contrast: gamma 0.6-1.6, global gain 0.8-1.25 (anchor errors), smooth
      multiplicative bias field (+-35 %), Gaussian noise (sigma <= 0.05).

    Parameters
    ----------
    image : ndarray (H, W) float32, normalised
    labels : ndarray (H, W) uint8
    rng : numpy Generator
    crop : int
        Output size (square).
    strength : float
        0 gives a plain centre crop.
    brain : ndarray (H, W) bool, optional
        Brain mask for the skull-strip simulation.

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

    def warp(a, order):
        return ndimage.affine_transform(a, rot, offset=offset, output_shape=(crop, crop), order=order,
                                        mode="constant", cval=0)

    img = warp(image, 1)
    lab = warp(labels, 0)
    if strength > 0:
        if brain is not None and rng.random() < 0.3 * strength:
            img = img * warp(brain.astype(np.uint8), 0)
        img = np.clip(img, 0, None)
        if rng.random() < 0.3 * strength:
            sig = [0.0, 0.0]
            sig[int(rng.integers(2))] = rng.uniform(0.5, 2.0)
            img = ndimage.gaussian_filter(img, sig)
        if rng.random() < 0.15 * strength:
            ax = int(rng.integers(2))
            f = [1.0, 1.0]
            f[ax] = 1.0 / rng.uniform(1.5, 3.0)
            small = ndimage.zoom(img, f, order=1)
            img = ndimage.zoom(small, (crop / small.shape[0], crop / small.shape[1]), order=1)[:crop, :crop]
        top = max(float(img.max()), 1e-6)
        img = (img / top) ** rng.uniform(0.6, 1.6) * top
        yy, xx = np.meshgrid(np.linspace(-1, 1, crop), np.linspace(-1, 1, crop), indexing="ij")
        coef = rng.uniform(-0.35, 0.35, 5) * strength
        bias = np.exp(coef[0] * xx + coef[1] * yy + coef[2] * xx * yy + coef[3] * xx**2 + coef[4] * yy**2)
        img = img * bias * rng.uniform(0.8, 1.25)
        img = img + rng.normal(0, rng.uniform(0, 0.05), img.shape)
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

    Every epoch draws all home-scanner slices that hold annotated foreground, at most
    ``external_per_epoch`` slices of the external sources (they hold only lesion slices
    and would otherwise outnumber the home data), and a random ``empty_fraction`` of
    the slices without foreground, shuffled. ``oversample`` maps a class index to
    how many times a slice in which that class is annotated *and present* is drawn
    per epoch (class-balanced sampling for a class that few subjects label: normal
    WMH is labelled in 2 of 11 volumes plus 20 PNG slices).
    """

    def __new__(cls, *args, **kwargs):  # build the PyDataset subclass lazily (keras import)
        import keras

        class _Seq(keras.utils.PyDataset):
            def __init__(self, data: SliceSet, batch_size: int, crop: int, seed: int,
                         augment_strength: float = 1.0, empty_fraction: float = 0.3,
                         oversample: dict | None = None, external_per_epoch: int = 64):
                super().__init__(workers=1, use_multiprocessing=False)
                self.data, self.batch_size, self.crop = data, batch_size, crop
                self.strength = augment_strength
                self.rng = np.random.default_rng(seed)
                has_fg = (data.labels > 0).reshape(len(data), -1).any(axis=1)
                external = data.sources != "ms3seg"
                self.fg = np.nonzero(has_fg & ~external)[0]
                self.ext = np.nonzero(has_fg & external)[0]
                self.external_per_epoch = external_per_epoch
                self.bg = np.nonzero(~has_fg)[0]
                self.empty_fraction = empty_fraction
                extra = []
                for c, factor in (oversample or {}).items():
                    has = (data.labels == c).reshape(len(data), -1).any(axis=1) & (data.annotated[:, c] > 0)
                    extra += [np.nonzero(has)[0]] * max(0, int(factor) - 1)
                self.extra = np.concatenate(extra).astype(int) if extra else np.zeros(0, int)
                self.on_epoch_end()

            def on_epoch_end(self):
                nb = int(round(self.empty_fraction * len(self.bg)))
                ne = min(len(self.ext), self.external_per_epoch)
                pick = np.concatenate([self.fg, self.extra, self.rng.choice(self.bg, nb, replace=False),
                                       self.rng.choice(self.ext, ne, replace=False)]).astype(int)
                self.order = self.rng.permutation(pick)

            def __len__(self):
                return int(np.ceil(len(self.order) / self.batch_size))

            def __getitem__(self, i):
                idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
                xs, ys = [], []
                for j in idx:
                    x, y = augment(self.data.images[j], self.data.labels[j], self.rng, self.crop, self.strength,
                                   self.data.brain[j])
                    xs.append(x)
                    ys.append(y)
                x = np.stack(xs)[..., None]
                return x, pack_targets(np.stack(ys), self.data.annotated[idx])

        return _Seq(*args, **kwargs)
