"""Participant level on real patients converted to BIDS (skipped without ../shared/data).

The patients are in the bundled model's training set, so this measures the pipeline
(BIDS input, deepbet brain mask, reorientation, resampling, writing on the native
grid), not generalisation (that is the model card's cross-validation). A geometry
error — a left-right flip, a shifted grid, a wrong axis order — drops ventricle Dice
below 0.3; the interim bundled model fitted these patients at 0.83-0.87 (ventricles)
and 0.66-0.77 (abnormal WMH) on 2026-11-22. The floors (0.6 and 0.4) leave room for
retrained weights while catching any geometry fault.
"""
import pytest

from conftest import needs_shared
from ms3seg_app.evaluation.evaluate import evaluate_pairs, find_pairs

VENTRICLE_FLOOR = 0.6
LESION_FLOOR = 0.4


@needs_shared
@pytest.mark.realdata
def test_real_patients_dice_above_floor(mixed_study):
    bids, out, deriv = mixed_study
    df = evaluate_pairs(find_pairs(out, deriv))
    assert sorted(df[df["class_name"] == "ventricles"]["flair"]) == [
        "subject-104670", "subject-105755", "subject-112776"]
    for _, r in df.iterrows():
        if r["class_name"] == "ventricles":
            assert r["dice"] >= VENTRICLE_FLOOR, r.to_dict()
        if r["class_name"] == "abnormal WMH":
            assert r["dice"] >= LESION_FLOOR, r.to_dict()
