"""Issue 14: ``--skull-strip auto`` takes already skull-stripped FLAIRs as they are (no deepbet run)."""
import glob

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, needs_shared


def _head(shape=(96, 112, 80), zooms=(2.0, 2.0, 2.0), stripped=False, noise_background=False, seed=0):
    """bench_speed's synthetic head (scalp, skull, brain, ventricles, lesions) at a coarse grid."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_speed import phantom

    data = phantom(shape, zooms, seed, stripped=stripped)
    if noise_background:
        data = data + np.abs(np.random.default_rng(seed).normal(0, 10, shape)).astype(np.float32) * (data == 0)
    aff = np.diag([*zooms, 1.0])
    aff[:3, 3] = -np.array(shape) * np.array(zooms) / 2
    return nib.Nifti1Image(data.astype(np.float32), aff)


@pytest.fixture
def deepbet_calls(monkeypatch):
    """Counts the runs of each deepbet network."""
    from ms3seg_app import brain_extraction as be

    calls = {"bbox_model": 0, "model": 0}
    orig = be._predict

    def counted(net, x, index=None):
        calls[net] += 1
        return orig(net, x, index)

    monkeypatch.setattr(be, "_predict", counted)
    return calls


def test_stripped_input_is_taken_as_it_is_without_the_segmentation_network(deepbet_calls):
    from ms3seg_app.stages.brain import brain_mask

    img = _head(stripped=True)
    mask, method, note = brain_mask(img, "auto")
    assert method == "none" and deepbet_calls == {"bbox_model": 1, "model": 0}
    assert "already skull-stripped" in note and "--skull-strip deepbet" in note
    np.testing.assert_array_equal(mask, np.asarray(img.dataobj) > 0)


def test_head_with_a_zero_background_is_still_skull_stripped(deepbet_calls):
    from ms3seg_app.stages.brain import brain_mask, looks_skull_stripped

    img = _head()
    stripped, why = looks_skull_stripped(img)
    assert not stripped and "deepbet calls only" in why
    deepbet_calls.update(bbox_model=0, model=0)
    mask, method, note = brain_mask(img, "auto")
    # the check's bounding-box network run is reused by brain extraction: once each
    assert method == "deepbet" and deepbet_calls == {"bbox_model": 1, "model": 1} and note is None
    assert mask.sum() < 0.9 * (np.asarray(img.dataobj) > 0).sum()  # skull and scalp left out


def test_noisy_background_needs_no_network_to_be_called_a_head(deepbet_calls):
    from ms3seg_app.stages.brain import looks_skull_stripped

    stripped, why = looks_skull_stripped(_head(noise_background=True))
    assert not stripped and "edge" in why and deepbet_calls == {"bbox_model": 0, "model": 0}


def test_thick_slices_may_hold_brain_in_the_first_and_last_slice():
    """A 2D FLAIR's top and bottom slices are not edges of the background: only in-plane faces count."""
    from ms3seg_app.stages.brain import looks_skull_stripped

    img = _head(shape=(128, 128, 18), zooms=(1.8, 1.8, 6.5), stripped=True)
    data = np.asarray(img.dataobj)
    assert data[:, :, 0].any() and data[:, :, -1].any()  # brain in the first and last slice
    assert looks_skull_stripped(img)[0]
    assert not looks_skull_stripped(_head(shape=(128, 128, 18), zooms=(1.8, 1.8, 6.5)))[0]


def _zero_background(img):
    """The head of a whole-head FLAIR with everything outside it set to 0 (as defacing or
    registration tools leave it): the case where the edges are zero but the skull is there."""
    from scipy import ndimage

    d = np.asarray(img.dataobj, np.float32)
    head = d > 0.1 * np.percentile(d, 99)
    for k in range(head.shape[2]):
        head[:, :, k] = ndimage.binary_fill_holes(ndimage.binary_closing(head[:, :, k], iterations=3))
    lab, _ = ndimage.label(head)
    head = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    return nib.Nifti1Image(d * head, img.affine)


@needs_shared
def test_development_flairs_whole_head_zeroed_head_and_bet_stripped_are_told_apart():
    from ms3seg_app.stages.brain import looks_skull_stripped

    flairs = sorted(glob.glob(str(SHARED_DATA / "ms3seg_sample" / "MS_100_patient_registered" / "*" / "*_FLAIR*.nii.gz")))
    assert len(flairs) == 20
    for f in flairs:
        img = nib.load(f)
        stripped, why = looks_skull_stripped(img)
        assert stripped == f.endswith("_FLAIR_brain.nii.gz"), (f, why)
        if not stripped:  # the same head with its background set to 0: still a head
            stripped, why = looks_skull_stripped(_zero_background(img))
            assert not stripped and "deepbet calls only" in why, (f, why)
        else:  # a slab of 10 of its slices (65 mm): too thin to tell, so brain extraction runs
            d = np.asarray(img.dataobj)
            stripped, why = looks_skull_stripped(nib.Nifti1Image(d[:, :, 5:15], img.affine))
            assert not stripped and "too little to tell" in why, (f, why)
