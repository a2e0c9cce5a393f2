import numpy as np
import pytest

from ms3seg_app.evaluation.metrics import evaluate_dseg, hd95, lesion_wise, overlap


def test_overlap_hand_computed():
    p = np.zeros((4, 4, 1), bool)
    t = np.zeros((4, 4, 1), bool)
    p[0, :3] = True      # 3 voxels
    t[0, 1:4] = True     # 3 voxels, 2 shared
    r = overlap(p, t)
    assert r["dice"] == pytest.approx(2 * 2 / 6)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["avd"] == 0.0
    assert overlap(np.zeros(3, bool), np.zeros(3, bool))["dice"] == 1.0


def test_hd95_shift_in_mm():
    p = np.zeros((20, 20, 20), bool)
    t = np.zeros_like(p)
    p[5:10, 5:10, 5:10] = True
    t[7:12, 5:10, 5:10] = True  # shifted 2 voxels along axis 0
    assert hd95(p, t, (1, 1, 1)) == pytest.approx(2.0)
    assert hd95(p, t, (3, 1, 1)) == pytest.approx(6.0)  # anisotropic spacing in mm
    assert np.isnan(hd95(p, np.zeros_like(t)))


def test_lesion_wise_counts_26_connectivity_and_min_size():
    t = np.zeros((20, 20, 20), bool)
    p = np.zeros_like(t)
    t[2:4, 2:4, 2:4] = True          # lesion A (8 vox) - detected
    t[10:12, 10:12, 10:12] = True    # lesion B (8 vox) - missed
    p[3:5, 3:5, 3:5] = True          # hits A
    p[15:17, 15:17, 15:17] = True    # false positive
    p[18, 18, 18] = True             # 1 voxel: below min size, ignored
    p[0, 0, 0] = True
    p[1, 1, 1] = True                # diagonal neighbour of (0,0,0): one 26-connected 2-voxel lesion, ignored
    r = lesion_wise(p, t, voxel_mm3=1.0)  # 3 mm³ = 3 voxels of 1 mm³
    assert (r["n_true_lesions"], r["n_pred_lesions"]) == (2, 2)
    assert r["ltpr"] == 0.5 and r["lfpr"] == 0.5 and r["lesion_f1"] == pytest.approx(0.5)
    r1 = lesion_wise(p, t, voxel_mm3=3.0)  # voxels of 3 mm³: every component is a lesion
    assert r1["n_pred_lesions"] == 4  # diagonal pair is one lesion under 26-connectivity


def test_evaluate_dseg_skips_unannotated_and_reports_ml():
    t = np.zeros((10, 10, 10), np.uint8)
    t[2:4, 2:4, 2:4] = 1
    t[6:8, 6:8, 6:8] = 3
    rows = evaluate_dseg(t, t, (1, 1, 2), annotated=(True, True, False, True))
    assert [r["class"] for r in rows] == [1, 3]
    assert rows[0]["dice"] == 1.0 and rows[0]["volume_true_ml"] == pytest.approx(8 * 2 / 1000)
    assert rows[1]["lesion_f1"] == 1.0
