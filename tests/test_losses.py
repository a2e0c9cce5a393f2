import numpy as np
import pytest

from ms3seg_app.model.losses import (MarginalDiceCE, exclusion_loss, marginal_cross_entropy,
                                     marginal_soft_dice)
from ms3seg_app.training.dataset import pack_targets


def _probs(rng, shape=(2, 6, 6, 4)):
    logits = rng.normal(size=shape)
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_marginal_ce_equals_plain_ce_when_all_annotated():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 6, 6)).astype(np.uint8)
    p = _probs(rng)
    y = pack_targets(labels, np.ones((2, 4), np.float32))
    got = float(marginal_cross_entropy(y, p))
    onehot = np.eye(4)[labels]
    plain = float(np.mean(-np.sum(onehot * np.log(p), axis=-1)))
    assert got == pytest.approx(plain, rel=1e-5)


def test_marginal_losses_invariant_to_moving_mass_between_bg_and_unannotated():
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 3], (2, 6, 6)).astype(np.uint8)  # class 2 not annotated
    ann = np.array([[1, 1, 0, 1]] * 2, np.float32)
    y = pack_targets(labels, ann)
    p = _probs(rng)
    q = p.copy()
    moved = 0.7 * q[..., 0]
    q[..., 0] -= moved
    q[..., 2] += moved
    for fn in (marginal_cross_entropy, marginal_soft_dice):
        assert float(fn(y, p)) == pytest.approx(float(fn(y, q)), rel=1e-5, abs=1e-6)
    # ... but moving mass to an annotated class changes the loss
    r = p.copy()
    r[..., 1] += moved
    r[..., 0] -= moved
    assert float(marginal_cross_entropy(y, r)) != pytest.approx(float(marginal_cross_entropy(y, p)))


def test_compound_loss_perfect_prediction_near_zero():
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, 2:5, 2:5] = 1
    labels[0, 6, 6] = 3
    y = pack_targets(labels, np.ones((1, 4), np.float32))
    p = np.eye(4, dtype=np.float32)[labels] * 0.999 + 0.00025
    loss = MarginalDiceCE()
    assert float(loss(y, p)) < 0.05
    assert MarginalDiceCE.from_config(loss.get_config()).dice_weight == 1.0


def test_exclusion_loss_penalises_unannotated_class_on_known_foreground():
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, :2] = 1                                      # known ventricles
    ann = np.array([[1, 1, 0, 1]], np.float32)             # normal WMH not annotated
    y = pack_targets(labels, ann)
    p = np.full((1, 4, 4, 4), 0.25, np.float32)
    base = float(exclusion_loss(y, p))
    q = p.copy()
    q[0, :2, :, 2] = 0.7                                   # NWMH on known ventricles: worse
    q[0, :2, :, 0] = 0.1
    q[0, :2, :, 1] = 0.1
    q[0, :2, :, 3] = 0.1
    assert float(exclusion_loss(y, q)) > base
    r = p.copy()
    r[0, 2:, :, 2] = 0.7                                   # NWMH on background: no information, no change
    r[0, 2:, :, 0] = 0.1
    r[0, 2:, :, 1] = 0.1
    r[0, 2:, :, 3] = 0.1
    assert float(exclusion_loss(y, r)) == pytest.approx(base)
    full = pack_targets(labels, np.ones((1, 4), np.float32))
    assert float(exclusion_loss(full, q)) == 0.0          # nothing unannotated: no term
