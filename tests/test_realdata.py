"""Participant level on real patients converted to BIDS (skipped without ../shared/data).

The patients are in the bundled model's training set, so this measures the pipeline
(BIDS input, deepbet brain mask, reorientation, resampling, writing on the native
grid), not generalisation (that is the model card's cross-validation). A geometry
error — a left-right flip, a shifted grid, a wrong axis order — drops ventricle Dice
below 0.3; the bundled model fits these patients at 0.83-0.87 (ventricles) and
0.66-0.77 (abnormal WMH), measured on 2026-11-22. The floors (0.6 and 0.4) leave room
for retrained weights while catching any geometry fault.
"""
import pytest

from conftest import needs_shared
from ms3seg_app.cli.run import main
from ms3seg_app.evaluation.evaluate import evaluate_pairs, find_pairs
from ms3seg_app.training.bids_data import write_bids
from ms3seg_app.training.readers import read_ms3seg_sample, read_trimask_sample

VENTRICLE_FLOOR = 0.6
LESION_FLOOR = 0.4


@needs_shared
@pytest.mark.realdata
def test_real_patients_dice_above_floor(shared_data, tmp_path):
    vols = [v for v in read_ms3seg_sample(shared_data / "ms3seg_sample") if v.subject in ("104670", "112776")]
    vols += [v for v in read_trimask_sample(shared_data / "trimask_sample") if v.subject == "105755"]
    deriv = write_bids(vols, tmp_path / "bids")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "bids"), str(out), "participant", "--skull-strip", "deepbet",
               "--skip-bids-validation", "--no-reports", "--device", "cpu"])
    assert rc == 0
    df = evaluate_pairs(find_pairs(out, deriv))
    assert len(df[df["class_name"] == "ventricles"]) == 3
    for _, r in df.iterrows():
        if r["class_name"] == "ventricles":
            assert r["dice"] >= VENTRICLE_FLOOR, r.to_dict()
        if r["class_name"] == "abnormal WMH":
            assert r["dice"] >= LESION_FLOOR, r.to_dict()
