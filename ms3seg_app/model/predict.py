"""Inference: FLAIR image in, per-class probabilities on the FLAIR's own grid out.

Everything the model needs is read from its card (:class:`~ms3seg_app.model.card.ModelCard`):
preprocessing, class table, post-processing. An ensemble's members are averaged
(softmax mean, nnU-Net's recipe), each with its left-right flipped prediction
(test-time augmentation); the members' disagreement is kept as an uncertainty map.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from ..preprocessing import to_model_slices
from ..preprocessing.geometry import SliceGeometry, per_slice_boxes
from .card import ModelCard, check_member, load_card, load_members, load_model

LOGGER = logging.getLogger("ms3seg.inference")

#: Slices whose normalised input never exceeds this (tissue is ~1) hold no head and are
#: not sent through the network: they are background with probability 1.
EMPTY_SLICE_MAX = 0.05
#: Probabilities on the input grid are kept in float16 (precision 5e-4, finer than the
#: 1/255 of the stored probability maps): half the memory of a large scan's 4-class volume.
PROB_DTYPE = np.float16
#: In-plane pixels per forward pass (16 slices of 256x256): bounds the activations of a
#: 512x512 scan while keeping batches of clinical scans large.
BATCH_PIXELS = 16 * 256 * 256
#: What :class:`Predictor` can crop each slice to (``crop``).
CROPS = ("head", "brain")
#: Context around each slice's region (brain, or head) in the network's in-plane crop, which
#: is then rounded up to a multiple of 16 px (4 pools): :func:`slice_crops`.
CROP_MARGIN_PX = 16
#: Ensemble spread of a voxel the network does not see (see :func:`outside_probabilities`).
OUTSIDE_UNCERTAINTY = 0.0


def outside_probabilities(n_classes: int) -> np.ndarray:
    """Class probabilities of every voxel the network does not see: outside each slice's
    crop, on slices not run, outside the brain mask and its bounding box.

    The one definition of that rule: background (class 0, the card's first class) with
    probability 1, the others 0; their ensemble spread is :data:`OUTSIDE_UNCERTAINTY`, their
    tri-mask label the argmax (0).

    Parameters
    ----------
    n_classes : int
        The card's number of classes, C.

    Returns
    -------
    ndarray (C,) float32
    """
    out = np.zeros(n_classes, np.float32)
    out[0] = 1.0
    return out


def _filled(shape, value, dtype) -> np.ndarray:
    """``np.full(shape, value, dtype)``, but a zero fill leaves the pages untouched
    (``np.zeros``: the kernel maps them when first written), so a region never written
    (a single network's spread, the tri-mask outside the brain's box) takes no memory."""
    out = np.zeros(shape, dtype)
    if np.any(value):
        out[...] = value
    return out


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict_image`.

    Probabilities and uncertainty are held for the brain's bounding box only (``box``);
    outside it every voxel has :attr:`outside`'s probabilities (:func:`outside_probabilities`):
    the synthetic 512x512x300 head of ``benchmarks/bench_speed.py --big`` holds
    0.30 of its 4-class volume (181 instead of 600 MiB). The
    whole-grid arrays are :attr:`probabilities` and :attr:`uncertainty` (built on request).

    Attributes
    ----------
    box_probabilities : ndarray (I', J', K', C) float16
        Per-class probabilities within ``box`` (stored order), summing to 1; C = number of
        classes in the card.
    dseg : ndarray (I, J, K) uint8
        Argmax, then the card's post-processing (:mod:`ms3seg_app.trimask`), whole grid.
    box_uncertainty : ndarray (I', J', K') float16, or None
        Standard deviation across ensemble members of the abnormal-WMH probability within
        ``box`` (0 where they agree; at most 0.5); None for a single network (no spread).
    box : tuple of 3 slices
        The stored-order region of the ``box_*`` arrays: the bounding box of the brain mask
        given to :meth:`Predictor.predict_image` (empty for an empty mask), or the whole grid.
    timings : dict
        Seconds of ``slicing`` (reorientation, resampling, normalisation; absent when the
        slices were made beforehand by :meth:`Predictor.prepare`), ``waiting_for_model``
        (networks still loading in the background, 0 once loaded), ``network``,
        ``inverse_resampling`` (onto the input grid) and ``postprocessing``.
    """

    box_probabilities: np.ndarray
    dseg: np.ndarray
    box_uncertainty: np.ndarray | None
    box: tuple
    timings: dict = field(default_factory=dict)

    @property
    def outside(self) -> np.ndarray:
        """Class probabilities of a voxel outside ``box`` (:func:`outside_probabilities`):
        ndarray (C,) float32."""
        return outside_probabilities(self.box_probabilities.shape[-1])

    def _on_grid(self, values: np.ndarray, outside) -> np.ndarray:
        """``values`` (held for ``box``) on the whole grid, ``outside`` elsewhere (a new array)."""
        out = np.empty(self.dseg.shape + values.shape[3:], values.dtype)
        out[...] = outside
        out[self.box] = values
        return out

    def probability(self, c: int) -> np.ndarray:
        """Class ``c``'s probability on the whole grid.

        Returns
        -------
        ndarray (I, J, K) of ``box_probabilities``' dtype (float16), a new array: outside
        ``box`` 1 for class 0 (background, the card's rule) and 0 for the others.

        Raises
        ------
        IndexError
            If ``c`` is not a class index.
        """
        return self._on_grid(self.box_probabilities[..., c], self.outside[c])

    @property
    def probabilities(self) -> np.ndarray:
        """All classes on the whole grid: ndarray (I, J, K, C) float16, a new array (built
        at each access: keep it rather than asking again)."""
        return self._on_grid(self.box_probabilities, self.outside)

    @property
    def uncertainty(self) -> np.ndarray | None:
        """The uncertainty on the whole grid: ndarray (I, J, K) float16 (a new array), or None."""
        return None if self.box_uncertainty is None else self._on_grid(self.box_uncertainty, OUTSIDE_UNCERTAINTY)


@dataclass
class ModelSlices:
    """A FLAIR resampled to the model's slices (:meth:`Predictor.prepare`), for one prediction.

    Attributes
    ----------
    geometry : SliceGeometry
        How the slices map to the FLAIR's voxel grid and back.
    x : ndarray (Z, H, W[, channels]) float32, or None
        Normalised axial RAS+ slices; None once :meth:`Predictor.predict_image` has run
        them (it frees them: 75 MiB for a 512x512x300 scan).
    seconds : float
        Time it took to make them.
    shape : tuple of 3 int
        The FLAIR's stored shape.
    image : weakref.ref
        The image object they were made of: :meth:`Predictor.predict_image` takes that very
        object (e.g. the N4-corrected image, not the raw one of the same shape).
    """

    geometry: SliceGeometry
    x: np.ndarray | None
    seconds: float
    shape: tuple
    image: weakref.ref


class Predictor:
    """A model (one network or an ensemble) loaded once, predicting many volumes.

    After nnU-Net's ``nnUNetPredictor``.

    Parameters
    ----------
    card : ModelCard
    models : list of keras.Model, or a concurrent.futures.Future of that list
        The card's members in order, or those of ``member_indices``; a future: networks
        still loading (:meth:`load` with ``background=True``; ``member_indices`` required).
    tta : bool
        Average each member with its left-right flipped prediction.
    batch_size : int
        Most slices per forward pass (fewer for large slices: :data:`BATCH_PIXELS`).
    member_indices : tuple of int, optional
        Which of the card's members ``models`` are (default: all, in order).
    crop : {"head", "brain"}
        In-plane crop of each slice that :meth:`predict_image` runs, given a brain mask:
        its head's box (default; the network sees the whole head) or its brain's box (less
        context, about a third less network time on clinical scans: ``--crop brain``); both
        plus :data:`CROP_MARGIN_PX`.
    """

    def __init__(self, card: ModelCard, models: list, tta: bool = True, batch_size: int = 16,
                 member_indices: tuple | None = None, crop: str = "head"):
        from concurrent.futures import Future

        self._pending = models if isinstance(models, (Future, _DeferredLoad)) else None
        if self._pending is None:
            if not models:
                raise ValueError("a Predictor needs at least one network")
            self._models = list(models)
        elif not member_indices:
            raise ValueError("networks still loading need their member_indices")
        self.card = card
        self.tta, self.batch_size, self.crop = tta, batch_size, crop
        #: which of the card's members ``models`` are (0-based; all of them unless a subset was loaded)
        self.member_indices = (tuple(member_indices) if member_indices is not None
                               else tuple(range(len(self._models))))
        self._fns = None
        self._graphs: dict = {}  # architecture key -> traced graph
        if len(self.member_indices) > 1:
            self.uncertainty_class  # an ensemble needs the lesion class for its spread: refuse early

    @property
    def models(self) -> list:
        """The networks (keras.Model), in the order of :attr:`member_indices`. While they still
        load in the background (:meth:`load` with ``background=True``) this waits for them, and
        raises their load's error (ModelError) if it failed, at every access."""
        if self._start_load() is not None:
            self._models = list(self._pending.result())
            self._pending = None
        return self._models

    def _start_load(self):
        """Start a deferred background load (:meth:`load`); the load's Future while the
        networks are not taken yet, else None."""
        if isinstance(self._pending, _DeferredLoad):
            self._pending = self._pending.start()
        return self._pending

    @property
    def crop(self) -> str:
        """The in-plane crop :meth:`predict_image` runs (see the class); a setting, not part of
        the networks: it may be changed between predictions (ValueError if not in :data:`CROPS`)."""
        return self._crop

    @crop.setter
    def crop(self, value: str) -> None:
        if value not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {value!r}")
        self._crop = value

    @property
    def uncertainty_class(self) -> int:
        """Label value whose probability spread over members is the uncertainty map (the
        card's lesion class; ModelError if the card has none; a single network has no spread
        and does not ask for it)."""
        return self.card.lesion_class

    @classmethod
    def load(cls, model=None, allow_unverified: bool = False, tta: bool = True, members=None,
             crop: str = "head", background: bool = False) -> "Predictor":
        """Load the card and networks of ``model`` (see :func:`~ms3seg_app.model.card.load_model`).

        Parameters
        ----------
        members : sequence of int, optional
            0-based indices of the card's members to run (default all; nnU-Net's ``-f``).
        crop : {"head", "brain"}
            See the class.
        background : bool
            Return once the card is read and the members' files are checked against it (so a
            bad card or a tampered file is refused here); the networks load in a thread of
            their own, and their first use (:attr:`models`, :meth:`predict_image`) waits for
            them. The thread starts when the first :meth:`prepare` has made its slices (or at
            that first use): Keras' deserialisation and the slicing's resampling both hold
            Python's lock, so the load overlaps brain extraction instead (TensorFlow, which
            releases it), as the CLI's first FLAIR does.

        Raises
        ------
        ModelError
            See :func:`~ms3seg_app.model.card.load_model`; with ``background``, the networks'
            own load errors (e.g. custom code refused by Keras safe mode) are raised at their
            first use instead.
        """
        if not background:
            models, card = load_model(model, allow_unverified, members)
            return cls(card, models, tta=tta, member_indices=card.member_indices(members), crop=crop)
        card = load_card(model)
        indices = card.member_indices(members)
        for i in indices:
            check_member(card.members[i], allow_unverified)
        return cls(card, _DeferredLoad(card, indices, allow_unverified), tta=tta, member_indices=indices, crop=crop)

    @classmethod
    def from_model(cls, model, card: dict | ModelCard, tta: bool = True, batch_size: int = 16,
                   crop: str = "head") -> "Predictor":
        """Wrap in-memory networks and a card dict (training and cross-validation).

        ``model`` may be one keras.Model or a list of them (an ensemble).
        """
        if isinstance(card, dict):
            card = ModelCard.from_dict(card)
        models = model if isinstance(model, (list, tuple)) else [model]
        return cls(card, models, tta=tta, batch_size=batch_size, crop=crop)

    @property
    def sha256(self) -> str:
        """Identity of the model: sha256 of its card file (which holds every member's sha256)."""
        return self.card.sha256

    def _member_fns(self) -> list:
        """One callable per member, ``f(x (B, H, W, ch) float32) -> (B, H, W, C)`` softmax
        (the mean with its left-right flipped prediction when TTA is on), compiled once.

        On Keras' TensorFlow backend the forward pass is a ``tf.function`` with an input
        signature of unknown batch size, height and width, so it is traced once per process
        although each FLAIR's in-plane crop differs (``keras.Model.predict`` traces a new
        graph per member and call: about 1 s each on 2 cores). Members with the same
        architecture (:func:`_architecture_key`) share one traced graph and pass their weights
        in as arguments (``stateless_call``): tracing once instead of per member saved 1.9 s
        of a 3-member ensemble's first batch (measured 2026-11-23, 2 cores). Other backends
        call the networks eagerly.
        """
        if self._fns is not None:
            return self._fns
        import keras
        from keras import ops

        tta = self.tta
        if keras.backend.backend() != "tensorflow":
            def eager(model):
                def f(x):
                    p = model(x, training=False)
                    if tta:
                        p = 0.5 * (p + ops.flip(model(ops.flip(x, axis=1), training=False), axis=1))
                    return p
                return f

            self._fns = [eager(m) for m in self.models]
            return self._fns
        import tensorflow as tf

        x_spec = tf.TensorSpec([None, None, None, self.card.input_channels], tf.float32)
        graphs = self._graphs
        fns = []
        for model in self.models:
            key = _architecture_key(model)
            if key not in graphs:
                graphs[key] = _stateless_graph(model, x_spec, tta)
            # the weights are read at each call: a network still training is never stale
            fns.append(lambda x, g=graphs[key], m=model: g([v.value for v in m.trainable_variables],
                                                           [v.value for v in m.non_trainable_variables], x))
        self._fns = fns
        return self._fns

    def _batches(self, h: int, w: int) -> int:
        """Slices per forward pass: :data:`BATCH_PIXELS` in-plane pixels, at least 1."""
        return max(1, min(self.batch_size, BATCH_PIXELS // (h * w)))

    def predict_slices(self, x: np.ndarray, run: np.ndarray | None = None, boxes: np.ndarray | None = None,
                       dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Predict preprocessed slices with every member.

        Each slice is run on its own in-plane crop: the box of its head
        (:data:`EMPTY_SLICE_MAX`), or of ``boxes``, widened by :data:`CROP_MARGIN_PX` on
        each side and to a multiple of 16 px (:func:`slice_crops`); outside it, and on
        slices not run, every pixel is background. The network is fully convolutional, and
        a slice's result depends on its own crop only: slices of the same crop size are
        batched together, which changes their results by float32 rounding at most.

        Parameters
        ----------
        x : ndarray (Z, H, W) or (Z, H, W, channels) float32
            Normalised slices in model geometry.
        run : ndarray (Z,) bool, optional
            Slices to predict (e.g. those holding brain); the others are background.
        boxes : ndarray (Z, 4) int, optional
            Per slice ``[row0, row1, col0, col1)``, the region to crop to instead of the
            head (``Predictor(crop="brain")``: the brain's,
            :meth:`~ms3seg_app.preprocessing.geometry.SliceGeometry.slice_boxes`); a slice
            with an empty box (``row0 >= row1``) is not run.
        dtype : numpy dtype, default float32
            Of the returned arrays (computed in float32; :data:`PROB_DTYPE` halves the
            memory of a large scan's slices).

        Returns
        -------
        (mean, spread) : ndarray (Z, H, W, C) softmax mean over members, and
        ndarray (Z, H, W) standard deviation over members of the abnormal-WMH
        probability, both of ``dtype``.
        """
        inp = x[..., None] if x.ndim == 3 else x
        inp = inp.astype(np.float32, copy=False)
        nz, h, w = inp.shape[:3]
        nc = self.card.n_classes
        mean = np.empty((nz, h, w, nc), dtype)
        mean[...] = outside_probabilities(nc)
        spread = _filled((nz, h, w), OUTSIDE_UNCERTAINTY, dtype)
        head = head_boxes(inp)
        if boxes is None:
            boxes = head
        else:  # a slice without head is not run whatever its region
            boxes = np.array(boxes, np.int64)
            boxes[head[:, 0] >= head[:, 1]] = 0
        if run is not None:
            boxes[~np.asarray(run, bool)] = 0
        crops = slice_crops(boxes, h, w)
        fns = self._member_fns()
        n = len(fns)
        uc = self.uncertainty_class if n > 1 else None
        # slices of equal crop size in batches, results straight into the outputs
        for size, zs in _by_crop_size(crops).items():
            bs = self._batches(*size)
            for i in range(0, len(zs), bs):
                ks = zs[i:i + bs]
                batch = np.stack([inp[z, crops[z][0]:crops[z][1], crops[z][2]:crops[z][3]] for z in ks])
                outs = [np.asarray(f(batch), np.float32) for f in fns]
                m = sum(outs[1:], outs[0]) / n
                if uc is not None:
                    # spread from the deviations to member 0: exactly 0 when the members agree
                    d = [o[..., uc] - outs[0][..., uc] for o in outs]
                    md, msq = sum(d) / n, sum(di * di for di in d) / n
                    sd = np.sqrt(np.maximum(msq - md * md, 0.0))
                for j, z in enumerate(ks):
                    r0, r1, c0, c1 = crops[z]
                    mean[z, r0:r1, c0:c1] = m[j]
                    if uc is not None:
                        spread[z, r0:r1, c0:c1] = sd[j]
        return mean, spread

    def prepare(self, img: nib.spatialimages.SpatialImage) -> ModelSlices:
        """Reorient, resample and normalise a FLAIR into the model's slices (the card's
        ``preprocessing``, :func:`~ms3seg_app.preprocessing.to_model_slices`).

        Parameters
        ----------
        img : nibabel image, 3D, any storage order

        Returns
        -------
        ModelSlices, for one :meth:`predict_image` of ``img``
        """
        t0 = time.perf_counter()
        geom, x = to_model_slices(img, self.card.preprocessing)
        self._start_load()  # networks loading in the background: from now on (see load)
        return ModelSlices(geom, x, time.perf_counter() - t0, tuple(int(v) for v in img.shape[:3]), weakref.ref(img))

    def predict_image(self, img: nib.spatialimages.SpatialImage, mask: np.ndarray | None = None,
                      slices: ModelSlices | None = None) -> Prediction:
        """Segment a 3D FLAIR.

        Parameters
        ----------
        img : nibabel image, 3D, any storage order
            FLAIR (whole head or skull-stripped).
        mask : ndarray (I, J, K) bool, stored order, optional
            Region where findings are kept (brain); outside it the voxels are background.
        slices : ModelSlices, optional
            ``self.prepare(img)``, made earlier (e.g. before brain extraction, while little
            memory is in use); used once: its pixels are freed here.

        Raises
        ------
        ValueError
            If ``slices`` were made of another image object, or were used already.

        Returns
        -------
        Prediction on the input voxel grid: the tri-mask on the whole grid, probabilities and
        uncertainty for the brain mask's bounding box (``Prediction.box``; the whole grid
        without ``mask``).
        """
        made_here = slices is None
        if made_here:
            slices = self.prepare(img)
        elif slices.x is None:
            raise ValueError("these model slices were used already: make new ones with prepare(img)")
        elif slices.image() is not img:
            raise ValueError(f"model slices made of another image (shape {slices.shape}) cannot serve a "
                             f"prediction of this one (shape {img.shape[:3]}): give prepare() and "
                             "predict_image() the same image object")
        geom, x = slices.geometry, slices.x
        slices.x = None
        t0 = time.perf_counter()
        self.models  # networks still loading (load(..., background=True)) are waited for here
        t1 = time.perf_counter()
        # slices without brain are not run: outside the mask every voxel is background
        run = boxes = None
        if mask is not None:
            brain = geom.slice_boxes(mask)
            run = brain[:, 0] < brain[:, 1]
            boxes = brain if self.crop == "brain" else None
        # slices kept in PROB_DTYPE, and the input slices freed, before the input-grid volumes exist
        p, spread = self.predict_slices(x, run, boxes, dtype=PROB_DTYPE)
        del x
        t2 = time.perf_counter()
        outside = outside_probabilities(p.shape[-1])
        # linear interpolation of per-slice softmax maps (and of the outside cval 1, 0, ...)
        # keeps them summing to 1: no renormalisation pass over the whole volume is needed.
        # Only the brain mask's bounding box (or the whole grid) is held: outside it all is background.
        shape = tuple(int(v) for v in img.shape[:3])
        box = tuple(slice(0, v) for v in shape)
        if mask is not None:
            from ..distance import bounding_box

            inside = np.asarray(mask, bool)
            box = bounding_box(inside) or (slice(0, 0),) * 3
        probs = geom.inverse(p, order=1, cval=list(outside), dtype=PROB_DTYPE, box=box, crop=True)
        del p
        np.clip(probs, 0.0, 1.0, out=probs)
        # a single network has no spread: no map (the lesion table says n/a, not "agreement")
        unc = None if len(self.models) == 1 else geom.inverse(spread, order=1, cval=OUTSIDE_UNCERTAINTY,
                                                               dtype=PROB_DTYPE, box=box, crop=True)
        del spread
        if unc is not None:
            np.clip(unc, 0.0, 0.5, out=unc)
        if mask is not None:
            outside_mask = ~inside[box]
            # in place, without boolean indexing (which builds int64 index arrays: 1.9 GB for
            # a 512x512x300 scan)
            np.copyto(probs, outside.astype(probs.dtype), where=outside_mask[..., None])
            if unc is not None:
                np.copyto(unc, OUTSIDE_UNCERTAINTY, where=outside_mask)
        t3 = time.perf_counter()
        spacing = tuple(float(z) for z in nib.affines.voxel_sizes(img.affine)[:3])  # mm, stored axes
        # outside the brain every voxel has the outside probabilities: the tri-mask (argmax,
        # components, distances) is made inside the brain's box only
        dseg = _filled(shape, np.argmax(outside), np.uint8)
        if probs.size:
            dseg[box] = self.postprocess(probs, spacing)
        # slicing is part of this call's time only when it made the slices
        timings = ({"slicing": slices.seconds} if made_here else {}) | {
            "waiting_for_model": t1 - t0, "network": t2 - t1, "inverse_resampling": t3 - t2, "postprocessing": time.perf_counter() - t3}
        return Prediction(probs, dseg, unc, box, timings)

    def postprocess(self, probs: np.ndarray, spacing) -> np.ndarray:
        """Tri-mask from probabilities with the card's post-processing.

        Parameters
        ----------
        probs : ndarray (I, J, K, C) float32
        spacing : 3 floats, voxel size in mm along I, J, K

        Returns
        -------
        ndarray (I, J, K) uint8
        """
        post = self.card.postprocessing
        if post.get("nwmh_max_ventricle_distance_mm") is not None:
            from ..trimask import enforce_periventricular_nwmh

            return enforce_periventricular_nwmh(probs, spacing, post["nwmh_max_ventricle_distance_mm"],
                                                nwmh=self.card.class_index("NWMH"),
                                                ventricles=self.card.class_index("VEN"))
        return argmax_uint8(probs)


class _DeferredLoad:
    """The networks' background load (:meth:`Predictor.load` with ``background=True``), not
    started yet: :meth:`start` runs :func:`_timed_load` in a thread of its own (called once:
    the Predictor keeps the Future instead).

    Started late rather than at once: the 1 mm scans' slicing (scipy.ndimage, which holds
    Python's lock) took 3.2-4.0 s instead of 1.3-1.6 s beside Keras' deserialisation (in one
    process, 2026-12-03, 2 cores). A load never started leaves no thread to wait for at exit.
    """

    def __init__(self, card: ModelCard, indices: tuple, allow_unverified: bool):
        self._args = (card, indices, allow_unverified)

    def start(self):
        """Start the load's thread; its ``concurrent.futures.Future``."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="ms3seg-model")
        future = pool.submit(_timed_load, *self._args)
        pool.shutdown(wait=False)  # the thread ends with the load
        return future


def _timed_load(card: ModelCard, indices: tuple, allow_unverified: bool) -> list:
    """:func:`~ms3seg_app.model.card.load_members` of files checked already, its time logged
    (``MODEL_LOAD_SECONDS``: benchmarks read it)."""
    t0 = time.perf_counter()
    models = load_members(card, indices, allow_unverified, verified=True)
    LOGGER.debug("MODEL_LOAD_SECONDS %.3f", time.perf_counter() - t0)
    return models


def _architecture_key(model) -> str:
    """The network's configuration with layer names replaced by their positions.

    Two members with the same key compute the same function of (weights, input), so one
    traced graph serves both.
    """
    import json

    text = json.dumps(model.get_config(), sort_keys=True, default=str)
    for i, layer in enumerate(model.layers):
        text = text.replace(json.dumps(layer.name), f'"#{i}"')
    return text.replace(json.dumps(model.name), '"#model"')


def _variable_locations(model) -> dict:
    """``id(variable) -> ("t"|"n", index)``: where each of ``model``'s variables sits in its
    ``trainable_variables`` / ``non_trainable_variables`` lists (as ``stateless_call`` takes them)."""
    loc = {id(v): ("t", i) for i, v in enumerate(model.trainable_variables)}
    loc.update({id(v): ("n", i) for i, v in enumerate(model.non_trainable_variables)})
    return loc


def _pick(tv, ntv, loc):
    """The value at ``loc`` (from :func:`_variable_locations`) of the lists ``tv``, ``ntv``."""
    return tv[loc[1]] if loc[0] == "t" else ntv[loc[1]]


def _functional_graph(model) -> tuple[dict, "Counter"]:
    """Connectivity of a functional network from its config (public API: the saved-model format).

    Returns
    -------
    (calls, uses)
        ``calls[name]``: one list per call of layer ``name``, of the names of the layers whose
        outputs that call takes; ``uses[name]``: how many inputs of other calls, and outputs of
        the network, are outputs of layer ``name``.
    """
    from collections import Counter

    def producers(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                yield obj["config"]["keras_history"][0]
            else:
                for v in obj.values():
                    yield from producers(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from producers(v)

    try:
        cfg = model.get_config()
    except NotImplementedError:  # a subclassed network: no graph to read, nothing is folded
        cfg = {}
    calls, uses = {}, Counter()
    for lc in cfg.get("layers", []):
        if "name" not in lc:  # a Sequential network's config: no graph is recorded, nothing folds
            continue
        calls[lc["name"]] = [list(producers(node)) for node in lc.get("inbound_nodes") or []]
        for srcs in calls[lc["name"]]:
            uses.update(srcs)
    # output_layers: [name, node, index], a list of those, or a dict of them (named outputs)
    outs = cfg.get("output_layers") or []
    if isinstance(outs, dict):
        outs = list(outs.values())
    if outs and not isinstance(outs[0], (list, tuple)):
        outs = [outs]
    for out in outs:
        if isinstance(out, (list, tuple)) and out and isinstance(out[0], str):
            uses[out[0]] += 1
    return calls, uses


def fold_batch_norm(model):
    """The network with every batch norm that follows a convolution folded into it.

    At inference a batch norm is a per-channel affine map; after a convolution it folds
    into the kernel and bias (Jacob et al., CVPR 2018, sec. 3.2):
    ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
    The folded network computes the same function (to float32 rounding: 2e-7 on the
    bundled members) with one pass less over every activation (13 % less network
    time for the bundled ensemble on 2 cores, measured 2026-12-01, when it went through
    this function; build_unet's networks are now folded without a copy, :func:`_unet_plan`).
    A convolution with an activation of its own is not folded.

    Parameters
    ----------
    model : keras.Model
        A functional network (channels-last ``Conv2D`` -> ``BatchNormalization`` pairs are
        folded where the convolution feeds only the batch norm).

    Returns
    -------
    (folded, weights) or None
        ``folded``: a copy of the architecture with biased convolutions and the folded
        batch norms replaced by identities (its own weights are not used);
        ``weights(tv, ntv) -> (ftv, fntv)``: the folded network's trainable and
        non-trainable weights computed from ``model``'s (lists in
        ``model.trainable_variables`` / ``non_trainable_variables`` order), for
        ``folded.stateless_call``. Computed at each call, so a network still training is
        never stale. None when nothing folds.
    """
    import keras
    from keras import layers

    calls, uses = _functional_graph(model)
    by_name = {layer.name: layer for layer in model.layers}  # not ops (e.g. x + y) the config also lists
    fold = {}  # conv layer name -> its batch norm
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or len(calls.get(layer.name, ())) != 1:
            continue
        srcs = calls[layer.name][0]
        src = by_name.get(srcs[0]) if len(srcs) == 1 else None
        if (isinstance(src, layers.Conv2D) and src.data_format == "channels_last" and layer.axis in (-1, 3)
                and getattr(src.activation, "__name__", "") == "linear"  # conv -> activation -> BN does not fold
                and len(calls.get(src.name, ())) == 1 and uses[src.name] == 1):
            fold[src.name] = layer
    if not fold:
        return None
    folded_bn = {bn.name for bn in fold.values()}

    class FoldedBatchNorm(layers.Layer):
        """Identity in place of a folded batch norm (same call signature)."""

        def call(self, inputs, training=None, mask=None):
            return inputs

    def clone(layer):
        cfg = layer.get_config()
        if layer.name in fold:
            cfg["use_bias"] = True
        elif layer.name in folded_bn:
            return FoldedBatchNorm(name=layer.name)
        return layer.__class__.from_config(cfg)

    folded = keras.models.clone_model(model, clone_function=clone)
    where = _variable_locations(model)

    # how each variable of `folded` is made from `model`'s: layers pair up by name (clone_model
    # keeps names and order), variables of unchanged layers pair up by position
    recipes = {}
    for fl in folded.layers:
        orig = by_name.get(fl.name)
        if orig is None:  # an op (e.g. x + y) the clone wraps as a layer of its own name
            if fl.variables:
                return None  # weights that cannot be paired: run the network as it is
            continue
        if fl.name in fold:
            loc, eps = _conv_bn_locations(orig, fold[fl.name], where)
            recipes[id(fl.kernel)] = ("kernel", loc, eps)
            recipes[id(fl.bias)] = ("bias", loc, eps)
        elif fl.name not in folded_bn:
            for fv, ov in zip(fl.variables, orig.variables, strict=True):
                recipes[id(fv)] = ("copy", where[id(ov)])
    plans = ([recipes[id(v)] for v in folded.trainable_variables],
             [recipes[id(v)] for v in folded.non_trainable_variables])

    def weights(tv, ntv):
        def make(plan):
            if plan[0] == "copy":
                return _pick(tv, ntv, plan[1])
            kind, loc, eps = plan
            return _folded(tv, ntv, loc, eps)[0 if kind == "kernel" else 1]

        return [make(p) for p in plans[0]], [make(p) for p in plans[1]]

    return folded, weights


def _conv_bn_locations(conv, bn, where: dict) -> tuple[dict, float | None]:
    """``(loc, eps)`` for :func:`_folded`: where ``conv``'s kernel and bias and its batch norm
    ``bn``'s ``gamma``, ``beta``, ``mean`` and ``var`` sit in the network's weight lists
    (``where`` from :func:`_variable_locations`; None for what the layer lacks, all four for
    ``bn=None``), and the batch norm's epsilon."""
    parts = {"kernel": conv.kernel, "bias": conv.bias if conv.use_bias else None,
             "gamma": bn.gamma if bn is not None and bn.scale else None,
             "beta": bn.beta if bn is not None and bn.center else None,
             "mean": bn.moving_mean if bn is not None else None,
             "var": bn.moving_variance if bn is not None else None}
    return {k: None if v is None else where[id(v)] for k, v in parts.items()}, (bn.epsilon if bn is not None else None)


def _folded(tv, ntv, loc: dict, eps: float) -> tuple:
    """``(kernel, bias)`` of a convolution with the batch norm after it folded in (Jacob et al.,
    CVPR 2018, sec. 3.2): ``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``.

    ``loc`` locates ``kernel``, ``bias``, ``gamma``, ``beta``, ``mean`` and ``var`` in the
    weight lists ``tv``/``ntv`` (:func:`_variable_locations`; None where the layer has none).
    """
    from keras import ops

    s = ops.rsqrt(_pick(tv, ntv, loc["var"]) + eps)
    if loc["gamma"] is not None:
        s = s * _pick(tv, ntv, loc["gamma"])
    b = (_pick(tv, ntv, loc["bias"]) if loc["bias"] is not None else 0.0) - _pick(tv, ntv, loc["mean"])
    return (_pick(tv, ntv, loc["kernel"]) * s,
            b * s + (_pick(tv, ntv, loc["beta"]) if loc["beta"] is not None else 0.0))


def _stateless_graph(model, x_spec, tta: bool):
    """``tf.function(weights, non-trainable weights, x) -> softmax`` of ``model``'s architecture.

    For :func:`~ms3seg_app.model.unet.build_unet`'s architecture (:func:`_unet_plan`) the
    batch norms are folded into the convolutions before them and the decoder's up-sampling
    into its convolutions, straight from ``model``'s weights; any other network runs as Keras
    computes it, its batch norms folded (:func:`fold_batch_norm`, which copies the network:
    0.4 s, so the U-Net path does without it).
    """
    import tensorflow as tf
    from keras import ops

    unet = _unet_plan(model)
    plan = fold_batch_norm(model) if unet is None else None
    net = plan[0] if plan else model

    def forward(tv, ntv, x):
        if unet is not None:
            from .unet import inference_forward

            depth, where = unet
            w = _unet_weights(tv, ntv, where)  # folded once per call, used by both TTA passes

            def run(t):
                return inference_forward(w, t, depth)
        else:
            if plan:
                tv, ntv = plan[1](tv, ntv)

            def run(t):
                return net.stateless_call(tv, ntv, t, training=False)[0]
        p = run(x)
        if tta:
            p = 0.5 * (p + ops.flip(run(ops.flip(x, axis=1)), axis=1))
        return p

    spec = ([tf.TensorSpec(v.shape, v.dtype) for v in model.trainable_variables],
            [tf.TensorSpec(v.shape, v.dtype) for v in model.non_trainable_variables], x_spec)
    # autograph=False: `forward` branches only on Python values fixed at trace time, so there is
    # nothing for AutoGraph to convert, and converting it (and every function it calls) took 2.0 s
    # of the 2.8 s trace on 2 cores (pyinstrument, 2026-12-02)
    return tf.function(forward, input_signature=spec, autograph=False)


def _unet_weights(tv, ntv, where: dict) -> dict:
    """Layer name -> ``(kernel, bias)`` of every convolution of a :func:`_unet_plan`, batch norms
    folded in, from the network's weight lists ``tv``/``ntv``."""
    out = {}
    for name, (loc, eps) in where.items():
        if loc["var"] is None:  # no batch norm after it (the output convolution)
            out[name] = (_pick(tv, ntv, loc["kernel"]), _pick(tv, ntv, loc["bias"]))
        else:
            out[name] = _folded(tv, ntv, loc, eps)
    return out


def _unet_plan(model):
    """``(depth, where)`` when ``model`` is :func:`~ms3seg_app.model.unet.build_unet`'s
    architecture, else None: ``where[name] = (loc, eps)`` locates each convolution's kernel and
    bias and the batch norm after it (``gamma``, ``beta``, ``mean``, ``var``; None where absent)
    in the network's (trainable, non-trainable) variable lists, as ``("t"|"n", index)``, for
    :func:`_unet_weights`.

    Checked by layer names, types and settings (linear 3x3 convolutions, each feeding only its
    batch norm), then numerically: on a random probe (32x48 for depth 4) with random weights,
    :func:`~ms3seg_app.model.unet.inference_forward` of the folded weights must match the
    network within 1e-4, else (a changed architecture) None and Keras runs it.
    """
    from keras import layers

    from .unet import inference_forward, layer_names

    by_name = {layer.name: layer for layer in model.layers}
    depth = sum(1 for n in by_name if n.startswith("pool"))
    names = layer_names(depth)
    kinds = {"conv": layers.Conv2D, "pool": layers.MaxPooling2D, "up": layers.UpSampling2D,
             "concat": layers.Concatenate, "trimask": layers.Conv2D}
    calls, uses = _functional_graph(model)
    try:
        for n in names:
            layer = by_name[n]
            kind = next(k for k in kinds if (k == "conv" and "_conv" in n) or n.startswith(k))
            if not isinstance(layer, kinds[kind]):
                return None
            if kind == "conv":
                bn = by_name[n.replace("_conv", "_bn")]
                if (tuple(layer.kernel_size) != (3, 3) or layer.padding != "same" or tuple(layer.strides) != (1, 1)
                        or layer.data_format != "channels_last" or layer.activation.__name__ != "linear"
                        or not isinstance(bn, layers.BatchNormalization) or bn.axis not in (-1, 3)
                        or calls.get(bn.name) != [[n]] or uses[n] != 1):  # each conv feeds its batch norm alone
                    return None
            if kind == "up" and (tuple(layer.size) != (2, 2) or layer.interpolation != "nearest"):
                return None
            if kind == "pool" and (tuple(layer.pool_size) != (2, 2) or tuple(layer.strides) != (2, 2)):
                return None
        out = by_name["trimask"]
        if tuple(out.kernel_size) != (1, 1) or not out.use_bias or out.activation.__name__ != "softmax":
            return None
    except (KeyError, StopIteration, AttributeError):
        return None
    at = _variable_locations(model)
    try:  # a kernel computed rather than held (e.g. quantised or LoRA layers): not this plan
        where = {n: _conv_bn_locations(by_name[n], by_name[n.replace("_conv", "_bn")] if n != "trimask" else None, at)
                 for n in names if "_conv" in n or n == "trimask"}
    except (KeyError, AttributeError):
        return None
    # numerical check on a probe, with random weights rather than the network's own: a fresh
    # network's batch norms are near identities, under which a changed wiring (e.g. ReLU before
    # the batch norm) would compute the same; batch-norm variances drawn positive
    # (kernels scaled by their fan-in so that activations stay of order 1 through the depth)
    rng = np.random.default_rng(0)
    x = rng.random((1, 2 * 2 ** depth, 3 * 2 ** depth, model.inputs[0].shape[-1])).astype(np.float32)
    role = {loc[k]: k for loc, _ in where.values() for k in ("kernel", "gamma", "var") if loc[k] is not None}

    def draw(v, key):
        shape = tuple(v.shape)
        if role.get(key) == "kernel":
            return rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if role.get(key) in ("gamma", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)  # biases, betas, means

    tv = [draw(v, ("t", i)) for i, v in enumerate(model.trainable_variables)]
    ntv = [draw(v, ("n", i)) for i, v in enumerate(model.non_trainable_variables)]
    want = np.asarray(model.stateless_call(tv, ntv, x, training=False)[0])
    if not np.allclose(np.asarray(inference_forward(_unet_weights(tv, ntv, where), x, depth)), want, atol=1e-4):
        LOGGER.warning("network %s looks like build_unet's but computes otherwise; run as is", model.name)
        return None
    return depth, where


def argmax_uint8(probs: np.ndarray) -> np.ndarray:
    """``np.argmax(probs, axis=-1)`` as uint8, channel by channel.

    numpy's argmax allocates an int64 volume (8 bytes per voxel); this keeps one float32
    and one uint8 volume. Ties go to the lower class, as with ``np.argmax``.

    Parameters
    ----------
    probs : ndarray (..., C) float

    Returns
    -------
    ndarray (...) uint8
    """
    best = probs[..., 0].copy()
    out = np.zeros(probs.shape[:-1], np.uint8)
    for c in range(1, probs.shape[-1]):
        better = probs[..., c] > best
        out[better] = c
        np.maximum(best, probs[..., c], out=best)
    return out


def head_boxes(x: np.ndarray) -> np.ndarray:
    """Per slice, the in-plane box of the pixels holding head (above :data:`EMPTY_SLICE_MAX`).

    Parameters
    ----------
    x : ndarray (Z, H, W, channels) float32, normalised model slices

    Returns
    -------
    ndarray (Z, 4) int64, ``[row0, row1, col0, col1)``; empty (zeros) for a slice without head
    """
    return per_slice_boxes((x > EMPTY_SLICE_MAX).any(axis=-1))


def slice_crops(boxes: np.ndarray, h: int, w: int) -> dict:
    """The network's crop of each slice: its box plus :data:`CROP_MARGIN_PX` on each side,
    widened to a multiple of 16 px (the U-Net's 4 poolings) within the ``h`` x ``w`` slice.

    Parameters
    ----------
    boxes : ndarray (Z, 4) int, ``[row0, row1, col0, col1)`` per slice (empty: not run)
    h, w : int, slice size in pixels

    Returns
    -------
    dict slice index -> ``(row0, row1, col0, col1)``, for the slices with a non-empty box
    """
    crops = {}
    for z, (r0, r1, c0, c1) in enumerate(np.asarray(boxes)):
        if r0 < r1 and c0 < c1:
            crops[z] = _padded_range(r0, r1 - 1, h) + _padded_range(c0, c1 - 1, w)
    return crops


def _by_crop_size(crops: dict) -> dict:
    """Slice indices grouped by crop size ``(rows, cols)``, in slice order."""
    groups: dict = {}
    for z, (r0, r1, c0, c1) in crops.items():
        groups.setdefault((r1 - r0, c1 - c0), []).append(z)
    return groups


def _padded_range(lo: int, hi: int, size: int, multiple: int = 16) -> tuple[int, int]:
    """``[a, b)`` covering ``lo..hi`` plus :data:`CROP_MARGIN_PX`, length a multiple of ``multiple``."""
    a = max(0, int(lo) - CROP_MARGIN_PX)
    b = min(size, int(hi) + 1 + CROP_MARGIN_PX)
    length = min(size, -(-(b - a) // multiple) * multiple)
    if a + length > size:
        a = size - length
    return a, a + length
