"""Training sampler, fold and validation-subject rules (no real data needed)."""
import numpy as np

from ms3seg_app.training.dataset import SliceSequence, SliceSet
from ms3seg_app.training.train import make_folds, validation_subjects


def _slice_set():
    n = 6
    labels = np.zeros((n, 16, 16), np.uint8)
    labels[0, 4:6, 4:6] = 2          # normal WMH, annotated
    labels[1, 4:6, 4:6] = 2
    labels[1, 8:10, 8:10] = 1
    labels[2, 4:6, 4:6] = 1          # ventricles only
    labels[3, 4:6, 4:6] = 3          # lesion only, normal WMH not annotated
    labels[4, 4:6, 4:6] = 1
    annotated = np.ones((n, 4), np.float32)
    annotated[3:, 2] = 0
    return SliceSet(np.zeros((n, 16, 16), np.float32), labels, annotated, np.array(list("abcdef")),
                    np.array(["ms3seg"] * n), np.ones((n, 16, 16), bool))


def test_sampler_oversamples_slices_with_labelled_normal_wmh():
    data = _slice_set()
    plain = SliceSequence(data, 4, 16, seed=0, empty_fraction=0.0)
    assert sorted(plain.order.tolist()) == [0, 1, 2, 3, 4]            # every foreground slice once
    seq = SliceSequence(data, 4, 16, seed=0, empty_fraction=1.0, oversample={2: 3})
    counts = np.bincount(seq.order, minlength=6)
    assert counts.tolist() == [3, 3, 1, 1, 1, 1]
    assert len(seq) == int(np.ceil(10 / 4))
    seq.on_epoch_end()
    assert np.bincount(seq.order, minlength=6).tolist() == [3, 3, 1, 1, 1, 1]
    x, y = seq[0]
    assert x.shape == (4, 16, 16, 1) and y.shape == (4, 16, 16, 8)


def test_validation_subject_is_partial_and_owns_no_png_slices():
    train = ["101228", "101627", "104252", "110218"]
    assert validation_subjects(train, ["104252"], {"101228"}) == ["101627"]
    assert validation_subjects(["101228", "104252"], ["104252"], {"101228"}) == ["101228"]  # no other choice
    assert validation_subjects(["104252"], ["104252"], set()) == []


def test_folds_are_disjoint_and_spread_fully_labelled_subjects():
    subjects = [f"s{i}" for i in range(11)]
    folds = make_folds(subjects, ["s3", "s7"], k=3, seed=0)
    flat = [s for f in folds for s in f]
    assert sorted(flat) == sorted(subjects) and len(flat) == len(set(flat))
    assert [sum(s in f for s in ("s3", "s7")) for f in folds].count(1) == 2
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
