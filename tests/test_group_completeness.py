"""Group level: a participant with a missing output file is flagged ``incomplete`` and left
out of the statistics, and the group level still succeeds.

The output folder is faked with pandas and json only (no model, no images are read).
"""
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from ms3seg_app.cli.run import main
from ms3seg_app.group import QC_TABLE, STATS_TABLE, collect_volumes, missing_outputs, run_group

AGES = {"01": 25, "02": 33, "03": 41, "04": 52, "05": 64}


def _volumes_row(sub: str) -> dict:
    a = float(sub)
    row = {"participant_id": f"sub-{sub}", "session_id": "n/a", "acq": "n/a", "run": "n/a",
           "flair": f"sub-{sub}_FLAIR.nii.gz", "ventricles_ml": 20 + a, "normal_wmh_ml": 1 + a / 10,
           "abnormal_wmh_ml": 2 * a, "lesion_count": int(a), "icv_ml": 1400 + a,
           "qc_warnings": 0, "slice_thickness_mm": 6.0, "inplane_mm": 0.9}
    for c in ("ventricles", "normal_wmh", "abnormal_wmh"):
        row[f"{c}_icv_fraction"] = row[f"{c}_ml"] / row["icv_ml"]
    for loc, share in (("periventricular", 0.5), ("juxtacortical", 0.3), ("deep", 0.2)):
        row[f"lesion_{loc}_ml"] = row["abnormal_wmh_ml"] * share
        row[f"lesion_{loc}_count"] = 1
        row[f"lesion_{loc}_share"] = share
    return row


def _fake_participant(out: Path, sub: str, outputs: bool = True, sidecar: bool = True) -> list[str]:
    """Write what the participant level writes for sub-<sub>; return the ``Outputs`` list."""
    anat = out / f"sub-{sub}" / "anat"
    anat.mkdir(parents=True)
    stem = f"sub-{sub}_space-orig"
    files = [f"{stem}_desc-trimask_dseg.nii.gz", f"{stem}_desc-brain_mask.nii.gz",
             f"{stem}_desc-lesions_table.tsv"]
    files += [f"{stem}_label-{lab}_probseg.nii.gz" for lab in ("VEN", "NWMH", "AWMH")]
    for name in files:
        (anat / name).write_bytes(b"placeholder")
    (anat / f"{stem}_desc-trimask_volumes.tsv").write_text(
        pd.DataFrame([_volumes_row(sub)]).to_csv(sep="\t", index=False))
    listed = [f"sub-{sub}/anat/{n}" for n in files + [f"{stem}_desc-trimask_volumes.tsv",
                                                        f"{stem}_desc-trimask_dseg.json"]]
    meta = {"Sources": [f"bids:raw:sub-{sub}/anat/sub-{sub}_FLAIR.nii.gz"], "SourceSHA256": f"{int(sub):064x}",
            "QCWarnings": []}
    if outputs:
        meta["Outputs"] = listed
    if sidecar:
        (anat / f"{stem}_desc-trimask_dseg.json").write_text(json.dumps(meta))
    return listed


@pytest.fixture
def study(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (bids / "participants.tsv").write_text(
        "participant_id\tage\tsex\n" + "".join(f"sub-{s}\t{a}\tF\n" for s, a in AGES.items()))
    _fake_participant(out, "01")
    _fake_participant(out, "02", outputs=False)      # written by an older version: not checked
    _fake_participant(out, "03", sidecar=False)      # dseg sidecar (the completion marker) missing
    _fake_participant(out, "04")
    _fake_participant(out, "05")
    probseg = out / "sub-01" / "anat" / "sub-01_space-orig_label-NWMH_probseg.nii.gz"
    probseg.unlink()
    return bids, out


def test_missing_outputs_function(study):
    _, out = study
    side = out / "sub-04" / "anat" / "sub-04_space-orig_desc-trimask_dseg.json"
    meta = json.loads(side.read_text())
    assert missing_outputs(out, side, meta) == []
    assert missing_outputs(out, side, {"Sources": []}) is None
    assert missing_outputs(out, side, None) == ["sub-04/anat/sub-04_space-orig_desc-trimask_dseg.json"]
    assert "not a list of paths" in missing_outputs(out, side, {"Outputs": "x"})[0]


def test_incomplete_flagged_and_left_out_of_statistics(study, caplog):
    bids, out = study
    caplog.set_level(logging.WARNING, logger="ms3seg")
    df = collect_volumes(out)
    assert dict(zip(df["participant_id"], df["qc_incomplete"])) == {
        "sub-01": True, "sub-02": False, "sub-03": True, "sub-04": False, "sub-05": False}
    assert "no 'Outputs' list" in caplog.text and "sub-02" in caplog.text

    run_group(bids, out, longitudinal=True, report=False)  # returns normally: not an error
    qc = pd.read_csv(out / QC_TABLE, sep="\t", keep_default_na=False)
    problems = dict(zip(qc["participant_id"], qc["problem"]))
    assert problems["sub-01"].startswith("incomplete (missing sub-01/anat/sub-01_space-orig_label-NWMH_probseg")
    assert problems["sub-01"].endswith("re-run the participant level for sub-01 (--participant-label 01)")
    assert "sub-03/anat/sub-03_space-orig_desc-trimask_dseg.json" in problems["sub-03"]
    assert "sub-02" not in problems and "sub-04" not in problems
    assert qc.loc[qc["participant_id"] == "sub-01", "flair"].item() == "sub-01"

    table = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    assert list(table["participant_id"]) == [f"sub-{s}" for s in AGES]  # still listed
    stats = pd.read_csv(out / STATS_TABLE, sep="\t")
    spearman = stats[(stats["test"] == "Spearman correlation") & (stats["measure"] == "abnormal_wmh_ml")]
    assert spearman["n"].item() == 3  # sub-02, sub-04, sub-05: the incomplete two are left out


def test_group_cli_still_exits_0(study):
    bids, out = study
    assert main([str(bids), str(out), "group"]) == 0
    qc = pd.read_csv(out / QC_TABLE, sep="\t", keep_default_na=False)
    assert "sub-01_space-orig_label-NWMH_probseg.nii.gz" in " ".join(qc["problem"])
