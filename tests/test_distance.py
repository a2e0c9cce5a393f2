"""Per-component distances without whole-volume distance maps (ms3seg_app.distance)."""
import numpy as np
import pytest
from scipy import ndimage

from ms3seg_app.distance import bounding_box, component_min_distance


@pytest.mark.parametrize("seed", range(4))
def test_component_min_distance_equals_edt_minimum(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (40, 36, 18), (0.9, 1.1, 3.5)
    target = ndimage.binary_dilation(rng.random(shape) > 0.997, iterations=2)
    comps = (rng.random(shape) > 0.97) & ~target
    comps[0, 0, 0] = True                      # a component on the array corner
    lab, n = ndimage.label(comps, structure=np.ones((3, 3, 3)))
    lab[target & (rng.random(shape) > 0.9)] = 1  # component 1 also overlaps the target: distance 0
    edt = ndimage.distance_transform_edt(~target, sampling=spacing)
    want = np.asarray(ndimage.minimum(edt, lab, np.arange(1, n + 1)))
    np.testing.assert_allclose(component_min_distance(lab, n, target, spacing), want, atol=1e-9)
    assert component_min_distance(lab, n, target, spacing)[0] == 0.0


def test_component_min_distance_empty_target_and_no_components():
    lab = np.zeros((5, 5, 5), int)
    lab[2, 2, 2] = 1
    assert np.isinf(component_min_distance(lab, 1, np.zeros_like(lab, bool), (1, 1, 1))).all()
    assert component_min_distance(np.zeros_like(lab), 0, lab > 0, (1, 1, 1)).shape == (0,)


def test_bounding_box_grows_and_clips():
    m = np.zeros((10, 12, 8), bool)
    m[2:4, 5, 7] = True
    assert bounding_box(m, (1, 2, 3)) == (slice(1, 5), slice(3, 8), slice(4, 8))
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None


def test_lesion_table_matches_whole_volume_distance_maps():
    """The lesion table's distances, centroids and means equal the whole-volume EDT recipe."""
    from ms3seg_app.lesion_definition import LESION
    from ms3seg_app.lesions import lesion_table

    rng = np.random.default_rng(3)
    shape, spacing = (48, 52, 20), (0.9, 0.9, 3.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-20, -25, -30]
    zz = np.indices(shape)
    brain = ((zz[0] - 24) / 20) ** 2 + ((zz[1] - 26) / 22) ** 2 + ((zz[2] - 10) / 8) ** 2 < 1
    dseg = np.zeros(shape, np.uint8)
    dseg[20:28, 22:30, 8:12] = 1
    les = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=1) & brain & (dseg == 0)
    dseg[les] = 3
    prob = rng.random(shape).astype(np.float16)
    unc = (rng.random(shape) * 0.5).astype(np.float16)
    table = lesion_table(dseg, affine, brain, prob, unc)
    lab, n = LESION.label(dseg == 3, float(np.prod(spacing)))
    assert len(table) == n > 3
    idx = np.arange(1, n + 1)
    d_vent = ndimage.distance_transform_edt(dseg != 1, sampling=spacing)
    d_surf = ndimage.distance_transform_edt(brain, sampling=spacing)
    np.testing.assert_allclose(table["dist_ventricles_mm"], ndimage.minimum(d_vent, lab, idx), atol=1e-9)
    np.testing.assert_allclose(table["dist_brain_surface_mm"], ndimage.minimum(d_surf, lab, idx), atol=1e-9)
    com = np.array(ndimage.center_of_mass(lab > 0, lab, idx))
    world = (np.c_[com, np.ones(n)] @ affine.T)[:, :3]
    np.testing.assert_allclose(table[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]], world, atol=1e-9)
    np.testing.assert_allclose(table["mean_probability"], ndimage.mean(prob.astype(float), lab, idx), atol=1e-9)
    np.testing.assert_allclose(table["uncertainty"], 2 * np.asarray(ndimage.mean(unc.astype(float), lab, idx)),
                               atol=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_label_counts_equal_bincount_without_a_whole_volume_copy(dtype):
    from ms3seg_app.distance import label_counts

    lab = np.random.default_rng(3).integers(0, 5, (17, 13, 9)).astype(dtype)
    np.testing.assert_array_equal(label_counts(lab), np.bincount(lab.ravel().astype(np.int64)))
    np.testing.assert_array_equal(label_counts(lab, 8), np.bincount(lab.ravel().astype(np.int64), minlength=8))
    np.testing.assert_array_equal(label_counts(np.zeros((4, 4, 2), dtype), 4), [32, 0, 0, 0])
