"""Lesion analysis on hand-made label volumes with known answers."""
import numpy as np
import pandas as pd
import pytest

from ms3seg_app.lesions import lesion_table, volume_table


def _case():
    # 1 x 1 x 2 mm voxels, 60 x 60 x 20, brain mask = inner box
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = [-30, -30, -20]
    d = np.zeros((60, 60, 20), np.uint8)
    brain = np.zeros(d.shape, bool)
    brain[5:55, 5:55, 2:18] = True
    d[25:35, 25:35, 8:12] = 1                      # ventricles: 400 voxels
    d[35:37, 25:35, 8:12] = 2                      # normal-WMH rim: 80 voxels (not a lesion)
    d[37:39, 28:30, 9:11] = 3                      # A: 3 mm (centre to centre) from the ventricle -> periventricular
    d[7:9, 30:32, 9:11] = 3                        # B: next to the brain edge -> juxtacortical (8 vox)
    d[20:22, 45:47, 9:11] = 3                      # C: deep (8 vox)
    d[45, 10, 5] = 3                               # D: 1 voxel = 2 mm^3 < 3 mm^3 -> ignored
    return d, aff, brain


def test_lesion_locations_and_geometry():
    d, aff, brain = _case()
    t = lesion_table(d, aff, brain)
    assert len(t) == 3
    by = {tuple(np.round(r[["centroid_x_mm", "centroid_y_mm"]].to_numpy(float), 1)): r for _, r in t.iterrows()}
    # centroid of A: voxel (37.5, 28.5, 9.5) -> mm (7.5, -1.5, -1.0)
    a = by[(7.5, -1.5)]
    assert a["location"] == "periventricular" and a["volume_mm3"] == pytest.approx(16.0)
    assert a["centroid_z_mm"] == pytest.approx(-1.0)
    assert a["dist_ventricles_mm"] == pytest.approx(3.0)    # voxel 37 to ventricle voxel 34
    assert by[(-22.5, 0.5)]["location"] == "juxtacortical"
    assert by[(-9.5, 15.5)]["location"] == "deep"
    assert list(t["lesion_id"]) == [1, 2, 3]


def test_lesion_values_held_for_a_box_give_the_whole_grid_table():
    """Probabilities and uncertainty held for the brain's box only (``value_box``) give the
    table of whole-grid arrays; a lesion outside the box is an error, not a wrong mean."""
    d, aff, brain = _case()
    d[45, 10, 5] = 0
    rng = np.random.default_rng(0)
    prob, unc = rng.random(d.shape), 0.5 * rng.random(d.shape)
    whole = lesion_table(d, aff, brain, prob, unc)
    box = (slice(5, 55), slice(5, 55), slice(2, 18))
    part = lesion_table(d, aff, brain, prob[box], unc[box], value_box=box)
    pd.testing.assert_frame_equal(part, whole)
    assert whole["mean_probability"].notna().all() and whole["uncertainty"].notna().all()
    with pytest.raises(ValueError, match="outside the probabilities' box"):
        small = (slice(5, 30), slice(5, 55), slice(2, 18))
        lesion_table(d, aff, brain, prob[small], unc[small], value_box=small)
    with pytest.raises(ValueError, match="awmh_prob has shape"):
        lesion_table(d, aff, brain, prob[box], unc[box])  # a box's arrays without value_box
    # nothing to read: the box is not consulted
    assert len(lesion_table(d, aff, brain, value_box=(slice(0, 1),) * 3)) == 3


def test_volume_table_in_ml():
    d, aff, brain = _case()
    t = lesion_table(d, aff, brain)
    v = volume_table(d, aff, t, brain)
    assert v["ventricles_ml"] == pytest.approx(400 * 2 / 1000)
    assert v["normal_wmh_ml"] == pytest.approx(80 * 2 / 1000)
    assert v["abnormal_wmh_ml"] == pytest.approx(25 * 2 / 1000)   # all class-3 voxels, the tiny one too
    assert v["lesion_count"] == 3
    assert v["icv_ml"] == pytest.approx(50 * 50 * 16 * 2 / 1000)
    assert v["lesion_periventricular_share"] == pytest.approx(1 / 3)
    assert v["lesion_deep_count"] == 1 and v["lesion_juxtacortical_ml"] == pytest.approx(0.016)


def test_no_lesions():
    d = np.zeros((10, 10, 10), np.uint8)
    t = lesion_table(d, np.eye(4))
    assert len(t) == 0 and "location" in t.columns
    v = volume_table(d, np.eye(4), t, None)
    assert v["lesion_count"] == 0 and np.isnan(v["icv_ml"])
