"""Losses for partially annotated tri-mask training.

Targets are packed as ``y_true`` of shape ``(N, H, W, 2K)``: the first ``K`` channels
are the one-hot label, the last ``K`` the per-sample annotation flags broadcast over
the image (1 where class ``k`` was annotated for this sample). Background is always
flagged annotated.

Marginal loss (Shi, Xi, Zhao, Zhao: "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation", Medical Image Analysis 70, 2021): for a sample
in which class ``c`` is not annotated, a voxel labelled background means "background
or ``c``", so the predicted probability of that merged label is ``p_bg + p_c``.
With every class annotated it reduces to plain categorical cross-entropy.
"""
from __future__ import annotations

import keras
from keras import ops

EPS = 1e-7


def split_target(y_true, n_classes: int = 4):
    """Split a packed target into ``(onehot, annotated)``, each ``(N, H, W, K)``."""
    return y_true[..., :n_classes], y_true[..., n_classes:]


def merge_probabilities(onehot, annotated, probs):
    """Marginal merge of unannotated classes into background.

    Parameters
    ----------
    onehot, annotated, probs : tensors (N, H, W, K)
        One-hot target, annotation flags (0/1), softmax probabilities.

    Returns
    -------
    (target, merged) : tensors (N, H, W, K)
        ``merged[..., 0] = p_bg + sum of p_c over unannotated c``, unannotated
        channels set to 0; ``target`` is the one-hot with unannotated channels
        folded into background (they are 0 already in a valid target).
    """
    unann = 1.0 - annotated
    extra = ops.sum(probs * unann, axis=-1, keepdims=True)
    merged = probs * annotated
    merged = ops.concatenate([merged[..., :1] + extra, merged[..., 1:]], axis=-1)
    target = onehot * annotated
    tgt_extra = ops.sum(onehot * unann, axis=-1, keepdims=True)
    target = ops.concatenate([target[..., :1] + tgt_extra, target[..., 1:]], axis=-1)
    return target, merged


def marginal_cross_entropy(y_true, y_pred, class_weights=None, n_classes: int = 4):
    """Voxel-mean marginal cross-entropy (Shi et al. 2021), optionally class-weighted.

    Parameters
    ----------
    y_true : tensor (N, H, W, 2K) packed target (see module docstring)
    y_pred : tensor (N, H, W, K) softmax probabilities
    class_weights : sequence of K floats, optional
        Weight of voxels by their (merged) target class.

    Returns
    -------
    scalar tensor
    """
    onehot, annotated = split_target(y_true, n_classes)
    target, merged = merge_probabilities(onehot, annotated, y_pred)
    ce = -ops.sum(target * ops.log(ops.clip(merged, EPS, 1.0)), axis=-1)
    if class_weights is not None:
        w = ops.sum(target * ops.convert_to_tensor(class_weights, dtype=target.dtype), axis=-1)
        return ops.sum(w * ce) / ops.maximum(ops.sum(w), EPS)
    return ops.mean(ce)


def marginal_soft_dice(y_true, y_pred, n_classes: int = 4, smooth: float = 1.0):
    """1 - mean soft Dice over foreground classes, counted only where annotated.

    Dice is summed over the batch (batch Dice, as nnU-Net) per class; a class that
    is not annotated in a sample contributes nothing from that sample.

    Returns
    -------
    scalar tensor in [0, 1]
    """
    onehot, annotated = split_target(y_true, n_classes)
    target, merged = merge_probabilities(onehot, annotated, y_pred)
    ann = annotated[..., 1:]
    t = target[..., 1:] * ann
    p = merged[..., 1:] * ann
    inter = ops.sum(t * p, axis=(0, 1, 2))
    denom = ops.sum(t, axis=(0, 1, 2)) + ops.sum(p, axis=(0, 1, 2))
    present = ops.cast(ops.sum(ann, axis=(0, 1, 2)) > 0, "float32")
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - ops.sum(dice * present) / ops.maximum(ops.sum(present), 1.0)


def exclusion_loss(y_true, y_pred, n_classes: int = 4):
    """Exclusion loss (Shi et al. 2021) for classes not annotated in a sample.

    A voxel labelled with an annotated *foreground* class ``k`` is known not to be
    any other class, including the unannotated ones: the loss is the mean of
    ``-log(1 - p_c)`` over those voxels and the unannotated classes ``c``. (Voxels
    labelled background carry no such information, since background may hide an
    unannotated class.)

    Returns
    -------
    scalar tensor (0 when every class is annotated)
    """
    onehot, annotated = split_target(y_true, n_classes)
    unann = (1.0 - annotated)[..., 1:]
    known_fg = ops.sum((onehot * annotated)[..., 1:], axis=-1, keepdims=True)  # (N,H,W,1)
    pen = -ops.log(ops.clip(1.0 - y_pred[..., 1:], EPS, 1.0)) * unann * known_fg
    denom = ops.maximum(ops.sum(unann * known_fg), 1.0)
    return ops.sum(pen) / denom


@keras.saving.register_keras_serializable(package="ms3seg")
class MarginalDiceCE(keras.losses.Loss):
    """Marginal cross-entropy + marginal soft Dice (+ exclusion loss), after Shi et al. 2021.

    Parameters
    ----------
    class_weights : sequence of K floats, optional
        Cross-entropy class weights.
    dice_weight : float
        Weight of the Dice term.
    exclusion_weight : float
        Weight of :func:`exclusion_loss` (0 disables).
    n_classes : int
    """

    def __init__(self, class_weights=None, dice_weight: float = 1.0, n_classes: int = 4,
                 exclusion_weight: float = 0.0, name: str = "marginal_dice_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = None if class_weights is None else [float(c) for c in class_weights]
        self.dice_weight = float(dice_weight)
        self.exclusion_weight = float(exclusion_weight)
        self.n_classes = int(n_classes)

    def call(self, y_true, y_pred):
        loss = marginal_cross_entropy(y_true, y_pred, self.class_weights, self.n_classes)
        loss = loss + self.dice_weight * marginal_soft_dice(y_true, y_pred, self.n_classes)
        if self.exclusion_weight:
            loss = loss + self.exclusion_weight * exclusion_loss(y_true, y_pred, self.n_classes)
        return loss

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights,
                "dice_weight": self.dice_weight, "exclusion_weight": self.exclusion_weight,
                "n_classes": self.n_classes}
