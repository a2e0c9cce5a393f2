import numpy as np

from ms3seg_app.trimask import enforce_periventricular_nwmh


def test_far_normal_wmh_is_reassigned_near_kept():
    probs = np.zeros((30, 30, 3, 4), np.float32)
    probs[..., 0] = 1.0
    def put(sl, c, p=0.8):
        probs[sl] = 0.0
        probs[sl + (c,)] = p
        probs[sl + (0,)] = 1 - p
    put((slice(10, 14), slice(10, 14), slice(0, 3)), 1)       # ventricle
    put((slice(14, 16), slice(10, 14), slice(0, 3)), 2)       # rim touching it: kept
    put((slice(25, 27), slice(25, 27), slice(1, 2)), 2)       # far blob
    probs[25:27, 25:27, 1, 3] = 0.15                           # second choice there: lesion
    probs[25:27, 25:27, 1, 0] = 0.05
    d = enforce_periventricular_nwmh(probs, (1.0, 1.0, 1.0), 5.0)
    assert (d[14:16, 10:14] == 2).all()
    assert (d[25:27, 25:27, 1] == 3).all()
    assert (d[10:14, 10:14] == 1).all()
    # without ventricles nothing is periventricular
    probs2 = probs.copy()
    probs2[10:14, 10:14, :, 1] = 0.0
    probs2[10:14, 10:14, :, 0] = 1.0
    assert not (enforce_periventricular_nwmh(probs2, (1, 1, 1)) == 2).any()
