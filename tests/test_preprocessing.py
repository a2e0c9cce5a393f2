import nibabel as nib
import numpy as np
import pytest

from ms3seg_app.distance import bounding_box
from ms3seg_app.exceptions import InputDataError
from ms3seg_app.preprocessing import SliceGeometry, normalize
from conftest import phantom_labels


def _img(data, zooms=(0.9, 0.9, 6.5), rot_deg=0.0):
    aff = np.diag(list(zooms) + [1.0])
    if rot_deg:
        t = np.deg2rad(rot_deg)
        r = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        aff[:3, :3] = r @ aff[:3, :3]
    aff[:3, 3] = [-30, -25, -40]
    return nib.Nifti1Image(data, aff)


@pytest.mark.parametrize("pixel_size", [0.9, 1.0])
@pytest.mark.parametrize("storage", ["axial", "sagittal", "coronal", "flipped", "oblique"])
def test_label_round_trip(storage, pixel_size):
    lab = phantom_labels()
    img = _img(lab)
    if storage == "sagittal":  # store with the S axis first: same world image
        img = img.as_reoriented(np.array([[2, 1], [0, 1], [1, 1]], float))
    elif storage == "coronal":
        img = img.as_reoriented(np.array([[0, 1], [2, 1], [1, 1]], float))
    elif storage == "flipped":
        img = img.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]], float))
    elif storage == "oblique":
        img = _img(lab, rot_deg=20.0)
    stored = np.asarray(img.dataobj)
    geom = SliceGeometry.from_image(img, pixel_size, 128, centre_on=stored > 0)
    slices = geom.forward(stored, order=0)
    assert slices.shape == (lab.shape[2], 128, 128)
    back = geom.inverse(slices.astype(np.float32), order=0)
    assert back.shape == stored.shape
    agree = np.mean(back.astype(np.uint8) == stored)
    fg = stored > 0
    fg_agree = np.mean(back.astype(np.uint8)[fg] == stored[fg])
    if pixel_size == 0.9:
        assert agree == 1.0  # same pixel size: exact
    else:
        assert agree > 0.98 and fg_agree > 0.85  # interpolation only


def test_storage_order_gives_identical_slices():
    """The model sees the same slices whatever the storage order (world-space equivalence)."""
    lab = phantom_labels()
    img = _img(lab)
    ref = SliceGeometry.from_image(img, 1.0, 128).forward(lab, order=0)
    for ornt in ([[2, 1], [0, 1], [1, 1]], [[0, -1], [1, -1], [2, -1]], [[1, 1], [2, -1], [0, 1]]):
        other = img.as_reoriented(np.array(ornt, float))
        data = np.asarray(other.dataobj)
        got = SliceGeometry.from_image(other, 1.0, 128).forward(data, order=0)
        np.testing.assert_array_equal(got, ref)


def test_probability_inverse_keeps_affine_grid():
    lab = phantom_labels()
    img = _img(lab, zooms=(0.5, 0.5, 1.0))
    geom = SliceGeometry.from_image(img, 1.0, 128, centre_on=lab > 0)
    onehot = np.eye(4, dtype=np.float32)[geom.forward(lab, order=0)]
    probs = geom.inverse(onehot, order=1, cval=[1, 0, 0, 0])
    assert probs.shape == lab.shape + (4,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    dice = []
    for c in (1, 2, 3):
        p, t = probs.argmax(-1) == c, lab == c
        dice.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert min(dice) > 0.85


def test_geometry_rejects_4d_and_singular():
    with pytest.raises(InputDataError):
        SliceGeometry.from_image(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), 1.0, 64)
    aff = np.eye(4)
    aff[2, 2] = 1e-12  # numerically singular
    with pytest.raises(InputDataError):
        SliceGeometry.from_image(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), aff), 1.0, 64)


def test_normalize_scale_invariant_and_constant_rejected():
    rng = np.random.default_rng(0)
    x = np.zeros((40, 40, 5), np.float32)
    x[8:32, 8:32] = rng.uniform(100, 200, (24, 24, 5))
    a, b = normalize(x), normalize(7.5 * x)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.max() <= 1.5 and a.min() >= 0
    with pytest.raises(ValueError):
        normalize(np.full((10, 10, 3), 5.0, np.float32))
    m = normalize(x, method="minmax")
    assert m.min() == 0 and m.max() == 1


def _stored_phantom(storage: str) -> nib.Nifti1Image:
    """The label phantom at 0.5x0.5x1 mm, stored axial, with i and j flipped, or sagittal."""
    img = _img(phantom_labels(), zooms=(0.5, 0.5, 1.0))
    if storage == "flipped":
        img = img.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]], float))
    elif storage == "sagittal":
        img = img.as_reoriented(np.array([[2, 1], [0, 1], [1, 1]], float))
    return img


@pytest.mark.parametrize("storage", ["axial", "flipped", "sagittal"])
def test_inverse_within_a_mask_equals_the_whole_grid_inside_its_box(storage):
    """Interpolating only the mask's bounding box gives the same values there, cval elsewhere."""
    img = _stored_phantom(storage)
    stored = np.asarray(img.dataobj)
    geom = SliceGeometry.from_image(img, 1.0, 128, centre_on=stored > 0)
    onehot = np.eye(4, dtype=np.float32)[geom.forward(stored, order=0)]
    mask = np.zeros(stored.shape, bool)
    idx = [slice(n // 4, n // 2 + 1) for n in stored.shape]
    mask[tuple(idx)] = True
    full = geom.inverse(onehot, order=1, cval=[1, 0, 0, 0])
    part = geom.inverse(onehot, order=1, cval=[1, 0, 0, 0], box=bounding_box(mask))
    np.testing.assert_array_equal(part[mask], full[mask])
    outside = part[~mask.any(axis=(1, 2))]
    assert (outside == np.eye(4, dtype=np.float32)[0]).all()


def _random_probabilities(storage: str, seed: int):
    """The stored phantom's geometry, its voxels, random 4-class model-slice probabilities
    (float32, summing to 1) and a box mask away from the edges."""
    img = _stored_phantom(storage)
    stored = np.asarray(img.dataobj)
    geom = SliceGeometry.from_image(img, 1.0, 128, centre_on=stored > 0)
    probs = np.random.default_rng(seed).dirichlet(np.ones(4), geom.forward(stored, order=0).shape)
    mask = np.zeros(stored.shape, bool)
    mask[tuple(slice(n // 5, n - n // 3) for n in stored.shape)] = True
    return geom, stored, probs.astype(np.float32), mask


@pytest.mark.parametrize("storage", ["axial", "flipped", "sagittal"])
def test_inverse_cropped_to_a_mask_is_the_whole_grid_result_in_the_masks_box(storage):
    """``crop=True`` returns the stored-order box (a mask's bounding box) only: the voxels of the
    whole-grid result there (flipped and permuted storage included); an empty mask gives an
    empty array."""
    geom, stored, probs, mask = _random_probabilities(storage, seed=4)
    mask[tuple(n // 5 for n in stored.shape)] = False  # not a box: the box is the bounding box
    box = bounding_box(mask)
    full = geom.inverse(probs, order=1, cval=[1, 0, 0, 0], box=box, dtype=np.float16)
    part = geom.inverse(probs, order=1, cval=[1, 0, 0, 0], box=box, dtype=np.float16, crop=True)
    assert part.shape == full[box].shape
    np.testing.assert_array_equal(part, full[box])
    one = geom.inverse(probs[..., 1], order=1, box=box, crop=True)
    np.testing.assert_array_equal(one, geom.inverse(probs[..., 1], order=1)[box])
    empty = geom.inverse(probs, order=1, cval=[1, 0, 0, 0], box=(slice(0, 0),) * 3, crop=True)
    assert empty.size == 0 and empty.shape[-1] == 4


@pytest.mark.parametrize("storage", ["axial", "flipped", "sagittal"])
def test_inverse_in_slice_chunks_equals_one_call(storage, monkeypatch):
    """Chunks of model slices interpolated separately give bit-identical volumes (the slice
    axis maps to itself), whatever the storage order and with or without a box."""
    import ms3seg_app.preprocessing.geometry as g

    geom, stored, probs, mask = _random_probabilities(storage, seed=3)
    nz = geom.ras_shape[2]
    results = {}
    for chunk in (10 ** 6, 3, 1):
        monkeypatch.setattr(g, "INVERSE_CHUNK_SLICES", chunk)
        results[chunk] = (geom.inverse(probs, order=1, cval=[1, 0, 0, 0]),
                          geom.inverse(probs, order=1, cval=[1, 0, 0, 0], box=bounding_box(mask), dtype=np.float16))
    assert nz > 3
    for chunk in (3, 1):
        np.testing.assert_array_equal(results[chunk][0], results[10 ** 6][0])
        np.testing.assert_array_equal(results[chunk][1], results[10 ** 6][1])


@pytest.mark.parametrize("order", [0, 1])
def test_unit_scale_maps_are_copies_equal_to_the_interpolation(monkeypatch, order):
    """1 mm voxels are the model's pixels: forward and inverse copy the overlap instead of
    interpolating, with the same result as scipy's affine_transform, edges included."""
    import ms3seg_app.preprocessing.geometry as geometry

    rng = np.random.default_rng(3)
    data = rng.random((300, 180, 7)).astype(np.float32)  # wider than the 256 px slice: cut on one axis
    if order == 0:
        data = (data * 4).astype(np.uint8)
    aff = np.diag([-1.0, 1.0, 2.0, 1.0])  # stored right-to-left
    img = nib.Nifti1Image(data, aff)
    head = np.zeros(data.shape, bool)
    head[40:290, 10:170] = True
    geom = geometry.SliceGeometry.from_image(img, pixel_size=1.0, size=256, centre_on=head)
    assert geometry._unit(geom._inplane()[0])
    within = np.zeros(data.shape, bool)
    within[50:200, 30:150, 1:6] = True
    fast_fwd = geom.forward(data, order=order, cval=0.25 if order else 0)
    slices = rng.random((7, 256, 256, 2)).astype(np.float32)
    fast_inv = [geom.inverse(slices, order=order, cval=[1.0, 0.0]),
                geom.inverse(slices, order=order, cval=[1.0, 0.0], box=bounding_box(within), dtype=np.float16)]
    monkeypatch.setattr(geometry, "_unit", lambda scale: False)
    np.testing.assert_array_equal(fast_fwd, geom.forward(data, order=order, cval=0.25 if order else 0))
    np.testing.assert_array_equal(fast_inv[0], geom.inverse(slices, order=order, cval=[1.0, 0.0]))
    np.testing.assert_array_equal(fast_inv[1], geom.inverse(slices, order=order, cval=[1.0, 0.0], box=bounding_box(within),
                                                            dtype=np.float16))
