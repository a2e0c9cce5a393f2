import numpy as np
import pytest

from ms3seg_app.model.losses import MarginalDiceCE, marginal_cross_entropy, marginal_soft_dice
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
