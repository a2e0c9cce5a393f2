"""Brain extraction with deepbet's networks ported to Keras (no PyTorch at run time).

deepbet 1.0.2 (https://github.com/wwu-mmll/deepbet, MIT licence, (c) 2023 Medical
Machine Learning Lab - University of Muenster; Fisch et al., Comput. Biol. Med. 2024)
segments the brain with two LinkNet3d networks shipped as TorchScript files.
``scripts/export_deepbet.py`` copied their parameters unchanged into
``ms3seg_app/data/deepbet/deepbet_1.0.2_linknet3d.npz``; this module rebuilds the
architecture as a function of those weights in ``keras.ops`` (TensorFlow is already a
dependency of the app; one ``tf.function`` for both networks, :func:`_linknet3d`) and
re-implements ``deepbet.bet.BrainExtraction.run`` step for step in NumPy/SciPy:

1. reorient to the closest canonical (RAS) orientation, first volume of a 4D image,
   float32, NaN -> 0;
2. nearest-exact resample to 128^3, 0.5 % / 99.5 % quantiles ``low``, ``high``;
3. ``bbox_model`` on the normalised 128^3 volume -> largest connected component of
   its foreground -> bounding box (+10 % margin per side) scaled to the input grid;
4. crop the input to that box, nearest-exact resample to 256^3, normalise with the
   same ``low``/``high``, ``model`` -> foreground probability, nearest-exact resample
   back into the box (zeros outside it);
5. ``probability > threshold``, largest 26-connected component and hole filling
   inside the box, reorient back to the input's voxel order.

Functions marked "after deepbet" below are NumPy translations of deepbet's torch /
cc3d / fill_voids code (MIT, see ``data/deepbet/LICENSE``).

Two exact rewrites make the networks cheaper on a CPU without changing what they
compute (beyond float32 rounding; :func:`_predict` agrees with the plain port, see
``tests/test_brain_extraction.py``):

- the first convolution (1 -> 16 channels, 7^3 kernel, stride 2) runs as a 4^3
  convolution with stride 1 over the 2^3 space-to-depth rearrangement of its padded
  input (8 channels; the kernel zero-padded to 8^3 and rearranged likewise): the same
  sums, but oneDNN's direct convolution is poor at one input channel (256^3 input:
  2.5 s -> 0.7 s on 2 cores);
- the last layer (transposed convolution, 8 -> 2 channels, 2^3 kernel, stride 2) maps
  each feature voxel to its own 2^3 output block, so its softmax probability is
  evaluated in NumPy only at the 256^3 voxels that the nearest-exact resampling back
  to the input grid reads (:func:`_head`): for a 20-slice clinical FLAIR 20 of 256
  planes, and never a 256^3 x 2 tensor.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from .exceptions import InputDataError, ModelError

__all__ = ["BoxStage", "box_stage", "brain_fraction", "deepbet_mask"]

WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "deepbet" / "deepbet_1.0.2_linknet3d.npz"
WEIGHTS_SHA256 = "4b7d84a7c05e981642496de8deb727e0c269e98f0bb59d5bd2ee54f493e42f60"

SMALL_SHAPE = (128, 128, 128)  # bbox_model input (deepbet run_model small_shape)
SHAPE = (256, 256, 256)  # model input (deepbet run_model shape)
BBOX_MARGIN = 0.1
NET_STRIDE = 32  # LinkNet3d's total down-sampling: its skip connections line up for multiples of it
_EPS = 1e-5  # torch.nn.InstanceNorm3d default

_NETS: dict = {}  # net name -> (forward function, head weights, head bias), made once per process
_LOCK = threading.Lock()


# --------------------------------------------------------------------------- network
def _space_to_depth_kernel(w: np.ndarray) -> np.ndarray:
    """deepbet's first convolution kernel (C, 1, 7, 7, 7) (torch Conv3d layout) as the
    (4, 4, 4, 8, C) kernel of :func:`_space_to_depth_conv`: zero-padded to 8^3 and rearranged
    in the channel order of the 2^3 space-to-depth rearrangement (float32)."""
    c = w.shape[0]
    w8 = np.zeros((c, 8, 8, 8), np.float32)
    w8[:, :7, :7, :7] = w[:, 0]
    # (out, 4, 2, 4, 2, 4, 2) -> (4, 4, 4, 2, 2, 2, out) -> (4, 4, 4, 8, out), channel order of the rearrangement
    return w8.reshape(c, 4, 2, 4, 2, 4, 2).transpose(1, 3, 5, 2, 4, 6, 0).reshape(4, 4, 4, 8, c)


def _space_to_depth_conv(x, kernel):
    """deepbet's first convolution (1 -> C channels, 7^3 kernel, stride 2, padding 3, no bias).

    Computed as a 4^3 stride-1 convolution over the 2^3 space-to-depth rearrangement of the
    padded input (8 channels), the kernel zero-padded to 8^3 and rearranged likewise: the same
    sums, but oneDNN's direct convolution is poor at one input channel (256^3: 2.5 -> 0.7 s).

    Parameters
    ----------
    x : tensor (N, D, H, W, 1) float32, even D, H, W
    kernel : array or tensor (4, 4, 4, 8, C) float32
        :func:`_space_to_depth_kernel` of the torch weight (C, 1, 7, 7, 7).

    Returns
    -------
    tensor (N, D/2, H/2, W/2, C): ``conv3d(pad(x, 3), w, stride 2)``.
    """
    from keras import ops

    x = ops.pad(x, ((0, 0), (3, 3), (3, 3), (3, 3), (0, 0)))
    s = ops.shape(x)
    n, d, h, wd = s[0], s[1] // 2, s[2] // 2, s[3] // 2
    x = ops.reshape(x, (n, d, 2, h, 2, wd, 2))
    x = ops.reshape(ops.transpose(x, (0, 1, 3, 5, 2, 4, 6)), (n, d, h, wd, 8))
    return ops.conv(x, kernel, strides=1, padding="valid")


#: deepbet's LinkNet3d traced once per process for both networks (they share the architecture):
#: (parameter names and shapes) -> (forward(x, weights), names of the layers it calls)
_TRACED: dict = {}


def _linknet3d(name: str, params: dict[str, np.ndarray]):
    """deepbet's ``LinkNet3d`` as a function of its input, channels-last (N, D, H, W, C).

    Written with ``keras.ops`` on the weights directly rather than as a ``keras.Model``:
    building the two networks as Keras layers and tracing them through ``predict_on_batch``
    took 2.3-3.0 s per process on 2 cores, this about 1.2 s (2026-12-02), with identical
    outputs. On Keras' TensorFlow backend the forward pass is one ``tf.function`` (a graph, as
    ``predict_on_batch`` ran: eagerly the 256^3 network peaked at 3.2 GB; the whole 3D
    benchmark run peaks at about 1.5 GB with this graph), traced once for any input size
    and, with the weights as its arguments, once for both networks (:data:`_TRACED`: that
    saved the second network's trace and part of its first call's graph set-up, 0.4 s on 2
    cores, with later calls as fast as with the weights as graph constants, 2026-12-02).

    Parameters
    ----------
    name : str
        ``"bbox_model"`` or ``"model"`` (names the network in messages).
    params : dict of str to ndarray
        The network's parameters as deepbet's TorchScript names them (``"<layer>.weight"``,
        ``"<layer>.bias"``), in PyTorch's layouts.

    PyTorch padding is symmetric, ``"same"`` is not for stride 2, so every strided
    convolution pads explicitly, and transposed convolutions run ``"valid"`` and crop what
    PyTorch's ``padding``/``output_padding`` remove.

    Returns
    -------
    (forward, head_w, head_b)
        ``forward(x (1, D, H, W, 1) float32) -> (1, D/2, H/2, W/2, 8)``: the input of deepbet's
        last layer, for D, H, W multiples of :data:`NET_STRIDE`; ``head_w`` (8, 8), ``head_b``:
        that layer as :func:`_head` takes it.

    Raises
    ------
    ModelError
        Parameters that do not fit the architecture.
    """
    from keras import ops

    # torch layouts -> Keras': Conv3d (out, in, d, h, w) and ConvTranspose3d (in, out, d, h, w)
    # both -> (d, h, w, *, *) with the last two as keras.ops.conv / conv_transpose take them
    weights = {}
    for key in sorted({k.rsplit(".", 1)[0] for k in params} - {"init.0", "tp_conv2"}):
        w, b = params.get(f"{key}.weight"), params.get(f"{key}.bias")
        if w is None or w.ndim != 5:
            raise ModelError(f"{WEIGHTS_PATH}: {name} layer {key} has no 3D convolution weight")
        weights[f"{key}.weight"] = np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0), np.float32)
        if b is not None:
            weights[f"{key}.bias"] = np.asarray(b, np.float32)
    w0 = params.get("init.0.weight")
    if w0 is None or "init.0.bias" in params or w0.shape[1:] != (1, 7, 7, 7):
        raise ModelError(f"{WEIGHTS_PATH}: init.0 is not the bias-free 1-channel 7^3 convolution the port expects")
    weights["init.0.weight"] = _space_to_depth_kernel(w0)
    # the last layer, tp_conv2 (transposed 2^3 conv, stride 2) + softmax, runs in _head
    w, b = params.get("tp_conv2.weight"), params.get("tp_conv2.bias")  # (8, 2, 2, 2, 2): (in, out, d, h, w)
    if w is None or b is None or w.shape[:2] != (8, 2) or w.shape[2:] != (2, 2, 2):
        raise ModelError(f"{WEIGHTS_PATH}: tp_conv2 is not the (8, 2, 2, 2, 2) transposed convolution the port expects")

    signature = tuple((k, v.shape) for k, v in sorted(weights.items()))
    if signature not in _TRACED:
        _TRACED[signature] = _trace_linknet3d(name, weights)
    run, called = _TRACED[signature]
    used = {"init.0.weight", "tp_conv2.weight", "tp_conv2.bias"} | {f"{k}.weight" for k in called} | {
        f"{k}.bias" for k in called if f"{k}.bias" in weights}
    if used != set(params):  # every parameter of the file is used, none twice-named or left over
        raise ModelError(f"{WEIGHTS_PATH}: parameters {sorted(set(params) - used)} of {name} do not fit the "
                         "LinkNet3d port")
    tensors = {k: ops.convert_to_tensor(v) for k, v in weights.items()}
    # logit(foreground) - logit(background) of output voxel (2i+p, 2j+q, 2k+r) is
    # features[i, j, k] @ head_w[:, 4p + 2q + r] + head_b (softmax of two classes = sigmoid of the difference)
    head_w = (w[:, 1] - w[:, 0]).reshape(8, 8).astype(np.float32)
    head_b = np.float32(b[1] - b[0])
    return (lambda x: run(x, tensors)), head_w, head_b


def _trace_linknet3d(name: str, weights: dict[str, np.ndarray]):
    """The LinkNet3d forward pass for weights named and shaped as ``weights``, for :func:`_linknet3d`.

    Parameters
    ----------
    name : str
        Names the network in messages.
    weights : dict of str to ndarray float32
        ``"<layer>.weight"`` (Keras layout, (d, h, w, in, out)), ``"<layer>.bias"`` where the
        layer has one, and ``"init.0.weight"`` as :func:`_space_to_depth_kernel` makes it.

    Returns
    -------
    (run, called)
        ``run(x (1, D, H, W, 1), weights as tensors) -> (1, D/2, H/2, W/2, 8)``: on Keras'
        TensorFlow backend a ``tf.function`` traced here for this signature, on other
        backends the plain function (checked by one eager pass at 32^3); ``called``: the
        layer names (without ``.weight``/``.bias``) the pass uses.

    Raises
    ------
    ModelError
        A layer the architecture needs is missing or has shapes that do not fit.
    """
    import keras
    from keras import ops

    called: set[str] = set()  # layers the forward pass uses (all of them must be)

    def forward(x, weights):
        def conv(x, key, stride=1, pad=0, transposed=False, out_pad=0):
            kernel, bias = weights[f"{key}.weight"], weights.get(f"{key}.bias")
            k = int(kernel.shape[0])
            called.add(key)
            if not transposed:
                if pad and (stride > 1 or 2 * pad != k - 1):
                    x = ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad), (0, 0)))
                    padding = "valid"
                else:
                    padding = "same" if pad else "valid"
                y = ops.conv(x, kernel, strides=stride, padding=padding)
            else:
                y = ops.conv_transpose(x, kernel, strides=stride, padding="valid")
            if bias is not None:
                y = y + bias
            if transposed:
                # valid output index v = stride*j + k; torch's is v - pad, length stride*(n-1) + k - 2*pad + out_pad
                end = pad - out_pad
                if pad or end:
                    y = y[:, pad:-end or None, pad:-end or None, pad:-end or None]
            return y

        def norm(y, relu=True):
            # torch.nn.InstanceNorm3d(affine=False, track_running_stats=False)
            mean, var = ops.moments(y, axes=[1, 2, 3], keepdims=True)
            y = (y - mean) * ops.rsqrt(var + _EPS)
            return ops.relu(y) if relu else y

        def cbr(x, key, relu=True, **kw):
            return norm(conv(x, key, **kw), relu)

        def block(x, key, stride, downsample):
            y = cbr(x, f"{key}.double_conv.0", stride=stride, pad=1)
            y = cbr(y, f"{key}.double_conv.3", relu=False, pad=1)
            skip = cbr(x, f"{key}.downsample.0", relu=False, stride=2) if downsample else x
            return ops.relu(y + skip)

        def up(x, key, stride):
            y = cbr(x, f"{key}.conv1.0")
            y = cbr(y, f"{key}.tp_conv.0", transposed=True, stride=stride, pad=1, out_pad=stride - 1)
            return cbr(y, f"{key}.conv2.0")

        x0 = norm(_space_to_depth_conv(x, weights["init.0.weight"]))
        # max pool k3 s2 p1 after ReLU: zero padding == torch's -inf padding since x >= 0
        x0 = ops.max_pool(ops.pad(x0, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0))), 3, strides=2, padding="valid")
        e = [x0]
        for i in range(4):
            h = block(e[-1], f"down{i}.block1", stride=1 if i == 0 else 2, downsample=i > 0)
            e.append(block(h, f"down{i}.block2", stride=1, downsample=False))
        d = up(e[4], "up0", 2) + e[3]
        d = up(d, "up1", 2) + e[2]
        d = up(d, "up2", 2) + e[1]
        d = up(d, "up3", 1) + e[0]
        y = cbr(d, "tp_conv1.0", transposed=True, stride=2, pad=1, out_pad=1)
        return cbr(y, "conv.0", pad=1)

    run = forward
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # autograph=False: no tensor-dependent Python control flow to convert
        run = tf.function(forward, autograph=False, input_signature=[
            tf.TensorSpec((1, None, None, None, 1), tf.float32),
            {k: tf.TensorSpec(v.shape, tf.float32) for k, v in weights.items()}])
    try:  # every layer's key and shapes: the graph is traced here, once (other backends: a small eager pass)
        if run is forward:
            forward(ops.zeros((1, 32, 32, 32, 1)), {k: ops.convert_to_tensor(v) for k, v in weights.items()})
        else:
            run.get_concrete_function()
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{WEIGHTS_PATH}: {name} does not fit the LinkNet3d port ({exc})") from exc
    return run, frozenset(called)


def _load_nets(net: str | None = None) -> dict:
    """Build deepbet's networks once per process (thread-safe): ``net`` (``"bbox_model"`` or
    ``"model"``) or, by default, both; returns the cache. The skull-stripped check of
    ``--skull-strip auto`` needs only the small one."""
    wanted = ("bbox_model", "model") if net is None else (net,)
    with _LOCK:
        if all(n in _NETS for n in wanted):
            return _NETS
        if not WEIGHTS_PATH.is_file():
            raise ModelError(f"{WEIGHTS_PATH} is missing; reinstall ms3seg-app or run scripts/export_deepbet.py")
        digest = hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise ModelError(
                f"{WEIGHTS_PATH} has sha256 {digest}, expected {WEIGHTS_SHA256}; "
                "reinstall ms3seg-app or re-run scripts/export_deepbet.py and update WEIGHTS_SHA256"
            )
        with np.load(WEIGHTS_PATH) as z:
            arrays = {k: z[k] for k in z.files}
        for name in wanted:
            if name not in _NETS:
                prefix = name + "/"
                _NETS[name] = _linknet3d(name, {k[len(prefix):]: v for k, v in arrays.items()
                                                      if k.startswith(prefix)})
        return _NETS


#: Output rows (first axis) of deepbet's last layer computed at a time by :func:`_head`.
HEAD_CHUNK_ROWS = 32


def _head(features: np.ndarray, head_w: np.ndarray, head_b: np.float32, index: list[np.ndarray]) -> np.ndarray:
    """Softmax foreground probability of deepbet's last layer at chosen output voxels.

    Parameters
    ----------
    features : numpy.ndarray
        ``float32`` ``(D, H, W, 8)``: input of the last layer (transposed 2^3 convolution,
        stride 2), whose output grid is ``(2D, 2H, 2W)``.
    head_w, head_b : numpy.ndarray, numpy.float32
        ``(8, 8)`` logit-difference weights (input channel, ``4p + 2q + r`` for the output
        offset ``(p, q, r)`` in its 2^3 block) and bias, from :func:`_linknet3d`.
    index : list of three int arrays
        Output-grid indices per axis (each in ``[0, 2n)``).

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(len(index[0]), len(index[1]), len(index[2]))``: the probability at
        ``index[0][a], index[1][b], index[2][c]``, i.e. the full output indexed with ``np.ix_``.
    """
    index = [np.asarray(i, np.int64) for i in index]
    # HEAD_CHUNK_ROWS output rows at a time: the gathered features, logits and their 2^3
    # blocks exist for one chunk, not for the whole box (0.2 GB beside a 512x512x300 head's
    # probabilities); each voxel's value is computed from its own feature voxel alone
    out = np.empty(tuple(len(i) for i in index), np.float32)
    for k in range(0, len(index[0]), HEAD_CHUNK_ROWS):
        out[k:k + HEAD_CHUNK_ROWS] = _head_rows(features, head_w, head_b,
                                                [index[0][k:k + HEAD_CHUNK_ROWS], index[1], index[2]])
    return out


def _head_rows(features: np.ndarray, head_w: np.ndarray, head_b: np.float32, index: list[np.ndarray]) -> np.ndarray:
    """:func:`_head` for one chunk of output rows.

    Parameters
    ----------
    features, head_w, head_b : as for :func:`_head`
    index : list of 3 int64 ndarrays, the chunk's rows and all columns and slices

    Returns
    -------
    ndarray float32 ``(len(index[0]), len(index[1]), len(index[2]))``
    """
    # only the feature voxels that are read: (|a|, |b|, |c|, 8) logit differences, then
    # depth-to-space into their 2^3 blocks, (2|a|, 2|b|, 2|c|), and the chosen voxels
    used = [np.unique(i // 2) for i in index]
    logits = features[np.ix_(*used)] @ head_w
    a, b, c = logits.shape[:3]
    blocks = logits.reshape(a, b, c, 2, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(2 * a, 2 * b, 2 * c)
    d = blocks[np.ix_(*(2 * np.searchsorted(u, i // 2) + i % 2 for u, i in zip(used, index)))]
    d += head_b
    # softmax over two classes, channel 1 == 1 / (1 + exp(logit_0 - logit_1)), in place
    np.negative(d, out=d)
    np.exp(d, out=d)
    d += np.float32(1)
    return np.reciprocal(d, out=d)


def _predict(net: str, x: np.ndarray, index: list[np.ndarray] | None = None) -> np.ndarray:
    """Foreground probability (channel 1 of the softmax) of network *net* on a 3D float32 volume.

    ``x`` has sizes that are multiples of :data:`NET_STRIDE` (deepbet runs at 128^3 and
    256^3); the output has ``x``'s shape, or with ``index`` (per-axis voxel indices) only
    those voxels, as ``y[np.ix_(*index)]``. ValueError for other sizes.
    """
    if any(n % NET_STRIDE for n in x.shape):
        raise ValueError(f"deepbet's networks take sizes that are multiples of {NET_STRIDE}, got {x.shape}")
    forward, head_w, head_b = _load_nets(net)[net]
    features = np.asarray(forward(x[None, ..., None].astype(np.float32, copy=False))[0])
    if index is None:
        index = [np.arange(n) for n in x.shape]
    return _head(features, head_w, head_b, index)


# ------------------------------------------------------------ pre/post-processing
def _nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of ``F.interpolate(mode="nearest-exact")`` on CPU (after PyTorch's
    ``HelperInterpNearestExact``: float32 ``scale * (i + 0.5) - 0.5``, evaluated fused
    as x86 builds do, then ``floorf(r + 0.5)``); checked against torch 2.13 for ~45 000 size pairs."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    r = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    idx = np.floor((r.astype(np.float64) + 0.5).astype(np.float32)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _resize_nearest_exact(x: np.ndarray, shape) -> np.ndarray:
    return x[np.ix_(*(_nearest_exact_index(n, m) for n, m in zip(x.shape, shape)))]


def _quantile(x: np.ndarray, q: float) -> np.float32:
    """``torch.quantile(x, q)`` (linear interpolation, float32 rank and lerp)."""
    flat = x.ravel()
    rank = np.float32(q) * np.float32(flat.size - 1)
    lo = int(np.floor(rank))
    hi = min(lo + 1, flat.size - 1)
    part = np.partition(flat, (lo, hi))
    a, b = np.float32(part[lo]), np.float32(part[hi])
    w = np.float32(rank - np.float32(lo))
    return np.float32(a + w * (b - a)) if w < 0.5 else np.float32(b - (b - a) * (np.float32(1) - w))


def _normalize(x: np.ndarray, low: np.float32, high: np.float32, copy: bool = True) -> np.ndarray:
    """After deepbet.utils.normalize (unbiased std, like torch.Tensor.std).

    Parameters
    ----------
    x : ndarray, any shape, float32 (other dtypes are converted, so copied)
    low, high : numpy.float32
        Intensities mapped to 0 and 1 before clipping (deepbet's 0.5 % and 99.5 % quantiles).
    copy : bool
        False: normalise a float32 ``x`` in place (the same float32 operations, so the same
        values) and return it.

    Returns
    -------
    ndarray of ``x``'s shape, float32
    """
    if copy or x.dtype != np.float32:
        x = (x - low) / np.float32(high - low)
    else:
        x -= low
        x /= np.float32(high - low)
    np.clip(x, 0, 1, out=x)
    # float32 arrays with float64 accumulators: ndarray.std(dtype=float64) would make two
    # float64 copies of a 256^3 volume (1.1 s of 5 s on 2 cores)
    mean = x.mean(dtype=np.float64)
    x -= np.float32(mean)
    std = np.sqrt(np.square(x).sum(dtype=np.float64) / (x.size - 1))
    x *= np.float32(0.226 / std)
    x += np.float32(0.449)
    return x


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """After deepbet.utils.keep_largest_connected_component (cc3d default: 26-connectivity)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(mask.shape, bool)
    # voxels per label counted a slice at a time (label_counts): np.bincount of the whole
    # volume would copy the int32 labels to int64 (0.27 GB for a 512x512x300 head's box)
    from .distance import label_counts

    return labels == label_counts(labels, n + 1)[1:].argmax() + 1


def _bbox_with_margin(mask_small: np.ndarray, shape, margin: float = BBOX_MARGIN) -> tuple[slice, ...] | None:
    """After deepbet BrainExtraction.get_bbox_with_margin / get_bbox (float32 arithmetic like torch)."""
    m = mask_small.astype(np.float32)
    rs = [np.flatnonzero(m.mean(axis=dims) > 0.02) for dims in ((1, 2), (0, 2), (0, 1))]
    if any(r.size == 0 for r in rs):
        return None
    center = np.array([(r.max() + 1 + r.min()) / 2 for r in rs], np.float32)
    size = np.array([(r.max() + 1) - r.min() for r in rs], np.float32)
    scale = np.array(shape, np.float32) / np.array(m.shape, np.float32)
    center, size = scale * center, scale * size
    size = (np.float32(1) + np.float32(2) * np.float32(margin)) * size
    center, size = np.round(center), np.round(size)
    bbox = [[int(c - s / 2), int(c + s / 2)] for c, s in zip(center, size)]
    return tuple(slice(max(0, b[0]), min(s, b[1]), 1) for b, s in zip(bbox, shape))


def finite(x: np.ndarray) -> np.ndarray:
    """``x`` with NaN as 0 and +-inf as the dtype's extremes (``np.nan_to_num``), copied only
    when it holds such values: a FLAIR that passed :func:`~ms3seg_app.stages.load_flair` is
    finite, and a copy of a 512x512x300 float32 volume is 300 MB. Never written to in place."""
    return x if np.isfinite(x).all() else np.nan_to_num(x)


def _source(img) -> str:
    return getattr(img, "get_filename", lambda: None)() or "<in-memory image>"


# ------------------------------------------------------------------------- public
class BoxStage(NamedTuple):
    """Steps 1-3 of deepbet for one image (:func:`box_stage`), shared by :func:`brain_fraction`
    and :func:`deepbet_mask` so that one FLAIR runs the bounding-box network once."""

    #: float32 (I', J', K'): the image's data in RAS (closest canonical) order, NaN -> 0
    x: np.ndarray
    #: 0.5 % and 99.5 % quantiles of the 128^3 resampling (deepbet's normalisation)
    low: np.float32
    high: np.float32
    #: bool (128, 128, 128): the bounding-box network's largest brain component
    mask_small: np.ndarray


def box_stage(img: nib.Nifti1Image) -> BoxStage:
    """Steps 1-3 of deepbet: RAS data, quantiles and the bounding-box network's brain at 128^3.

    Parameters
    ----------
    img : nibabel.Nifti1Image, 3D (or 4D: volume 0)

    Returns
    -------
    BoxStage

    Raises
    ------
    InputDataError
        A constant image (no intensity range); the message names the file.
    ModelError
        The bundled weight file is missing or its sha256 does not match.
    """
    src = _source(img)
    canon = nib.as_closest_canonical(img)
    # np.asarray(dataobj) applies scl_slope/scl_inter like deepbet's get_fdata()
    x = finite(np.asarray(canon.dataobj[..., 0] if len(canon.shape) == 4 else canon.dataobj, dtype=np.float32))
    x_small = _resize_nearest_exact(x, SMALL_SHAPE)
    low, high = _quantile(x_small, 0.005), _quantile(x_small, 0.995)
    if not high > low:
        raise InputDataError(
            f"{src}: image intensities have no range (0.5-99.5 % quantiles both {low}); "
            "the file is empty or constant - check the conversion to NIfTI"
        )
    return BoxStage(x, low, high, _largest_component(_predict("bbox_model", _normalize(x_small, low, high)) > 0.5))


def _stage_for(img: nib.Nifti1Image, stage: BoxStage | None) -> BoxStage:
    """``stage`` if given (ValueError when its data cannot be ``img``'s: another shape in RAS
    order), else ``box_stage(img)``."""
    if stage is None:
        return box_stage(img)
    ras_shape = [0, 0, 0]
    for axis, (ras_axis, _) in enumerate(nib.io_orientation(img.affine)):
        ras_shape[int(ras_axis)] = img.shape[axis]
    if tuple(stage.x.shape) != tuple(ras_shape):
        raise ValueError(f"a BoxStage of shape {stage.x.shape} was passed for an image of RAS shape "
                         f"{tuple(ras_shape)}: it belongs to another image")
    return stage


def brain_fraction(img: nib.Nifti1Image, stage: BoxStage | None = None) -> float:
    """Fraction of the image's voxels above 0 that deepbet's bounding-box network calls brain.

    Near 1 for an image already skull-stripped (its voxels above 0 are the brain), well below
    1 for a head (skull, scalp and any noisy background are above 0 but not brain). The
    network runs at 128^3 (0.4 s on 2 cores); its largest brain component is resampled back
    to the image grid (nearest-exact, as deepbet does) and intersected with the voxels above 0.

    Parameters
    ----------
    img : nibabel.Nifti1Image, 3D (or 4D: volume 0)
    stage : BoxStage, optional
        ``box_stage(img)``, if already computed (ValueError if its shape shows it is another image's).

    Returns
    -------
    float
        In ``[0, 1]``; 0 when no voxel is above 0.

    Raises
    ------
    InputDataError, ModelError
        As :func:`deepbet_mask` (e.g. a constant image).
    """
    x, _, _, mask_small = _stage_for(img, stage)
    positive = x > 0
    n = int(np.count_nonzero(positive))
    if n == 0:
        return 0.0
    inside = np.count_nonzero(positive & _resize_nearest_exact(mask_small, x.shape))
    return inside / n


def deepbet_mask(img: nib.Nifti1Image, threshold: float = 0.5, stage: BoxStage | None = None) -> np.ndarray:
    """Brain mask of a head MRI by deepbet 1.0.2's networks, run in Keras (no PyTorch).

    Reproduces ``deepbet.bet.BrainExtraction(no_gpu=True).run(img, threshold=threshold)``
    (``n_dilate=0``): canonical reorientation, nearest-exact resampling to 128^3 for
    the bounding-box network and of the box to 256^3 for the segmentation network,
    quantile normalisation, thresholding, largest 26-connected component and hole
    filling inside the box, and reorientation back to the input grid.  Both networks
    are built and their weights (``data/deepbet/deepbet_1.0.2_linknet3d.npz``,
    sha256-checked) loaded on the first call and cached for the process.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        Head image, 3D ``(I, J, K)`` or 4D ``(I, J, K, T)`` (only volume 0 is used),
        any numeric dtype and any orientation the affine can express; NaN voxels
        count as 0.  deepbet was trained on T1w images; on ten MS3SEG FLAIRs
        (0.9 x 0.9 x 6.8-8.1 mm) its masks agree with FSL BET's at Dice 0.89-0.96.
    threshold : float, default 0.5
        Cut-off on the network's brain probability, in ``[0, 1)``.
    stage : BoxStage, optional
        ``box_stage(img)``, if already computed (e.g. by :func:`brain_fraction`'s caller);
        ValueError if its shape shows it is another image's.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of shape ``(I, J, K)`` (``img.shape[:3]``), in the voxel
        (axis) order of ``img``'s data array, True inside the brain.

    Raises
    ------
    InputDataError
        The image is not 3D/4D, has a zero-sized axis, is constant (no intensity
        range), or the networks find no head or brain in it; the message names the
        file and the fix.
    ModelError
        The bundled weight file is missing or its sha256 does not match.
    ValueError
        ``threshold`` is outside ``[0, 1)``.
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    src = _source(img)
    if len(img.shape) not in (3, 4) or min(img.shape[:3]) < 1 or (len(img.shape) == 4 and img.shape[3] < 1):
        raise InputDataError(
            f"{src}: brain extraction needs a 3D (or 4D) head image, got shape {img.shape}; "
            "pass the FLAIR (or T1w) volume itself"
        )
    x, low, high, mask_small = _stage_for(img, stage)
    bbox = _bbox_with_margin(mask_small, x.shape)
    if bbox is None or any(s.stop - s.start < 1 for s in bbox):
        raise InputDataError(
            f"{src}: deepbet found no head in the image; check that it is a head MRI "
            "(FLAIR or T1w) with a correct affine, not a mask or a derived map"
        )
    # normalised in place: one 256^3 float32 volume (64 MiB) fewer beside the network's activations
    crop = _normalize(_resize_nearest_exact(x[bbox], SHAPE), low, high, copy=False)
    # probabilities only where the nearest-exact resampling back into the box reads them
    into_box = [_nearest_exact_index(n, m) for n, m in zip(SHAPE, x[bbox].shape)]
    prob_box = _predict("model", crop, into_box)
    del crop

    brain = prob_box > threshold
    del prob_box  # freed before labelling (0.14 GB of float32 for a 512x512x300 head's box)
    mask = np.zeros(x.shape, bool)
    inner = _largest_component(brain)
    del brain
    if not inner.any():
        raise InputDataError(
            f"{src}: deepbet found no brain in the image (threshold {threshold}); check that "
            "it is a head MRI with a correct affine, or lower the threshold"
        )
    mask[bbox] = ndimage.binary_fill_holes(inner)  # fill_voids.fill == binary_fill_holes

    # back to img's voxel order (after deepbet.utils.reoriented_nifti)
    ornt = nib.io_orientation(img.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(mask, back)).astype(bool)
