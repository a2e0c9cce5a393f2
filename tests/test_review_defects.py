"""Defects found by the review of 2026-12-03: stale completion markers, outputs of FLAIRs that
differ only in task/echo/part/chunk, voxel sizes from the affine, session order."""
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT

EXAMPLE = ROOT / "bids_example"


def _run(argv):
    from ms3seg_app.cli.run import main

    return main([str(a) for a in argv])


def _args(model, *extra):
    return ["participant", "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu", "--no-reports",
            "--model", model, *extra]


def _dataset(tmp_path, subjects=("02",)):
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    for sub in bids.glob("sub-*"):
        if sub.name.removeprefix("sub-") not in subjects:
            shutil.rmtree(sub)
    pt = bids / "participants.tsv"
    if pt.is_file():
        df = pd.read_csv(pt, sep="\t", dtype=str)
        df[df["participant_id"].isin([f"sub-{s}" for s in subjects])].to_csv(pt, sep="\t", index=False)
    return bids


def test_a_failed_rerun_leaves_the_flair_incomplete_and_the_group_reports_it(tmp_path, tiny_model):
    """A FLAIR re-converted into a broken file: the rerun fails, the previous run's completion
    marker is gone, and the group level lists the failure and flags the old tables as incomplete
    (before: the old results were reported as current, the crash log hidden)."""
    bids, out = _dataset(tmp_path), tmp_path / "out"
    assert _run([bids, out, *_args(tiny_model)]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    assert side.is_file()
    flair = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    img = nib.load(flair)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), flair)
    assert _run([bids, out, *_args(tiny_model)]) == 1
    assert not side.exists(), "the previous run's completion marker survived a failed rerun"
    assert _run([bids, out, "group"]) == 0
    vol = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    row = vol[vol["participant_id"] == "sub-02"].iloc[0]
    assert "incomplete" in row["qc_flags"]
    qc = pd.read_csv(out / "group_desc-trimask_qc.tsv", sep="\t", keep_default_na=False)
    assert any("NaN" in p for p in qc["problem"]), qc.to_string()


def test_a_rerun_stopped_while_writing_leaves_no_completion_marker(tmp_path, tiny_model, monkeypatch):
    """A rerun with other options stopped between its first tables and its sidecar (walltime,
    quota): the FLAIR is incomplete, not the new tables under the old run's sidecar."""
    from ms3seg_app import participant

    bids, out = _dataset(tmp_path), tmp_path / "out"
    assert _run([bids, out, *_args(tiny_model)]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    write = participant.atomic_write_text

    def stop_at_volumes(path, text):
        if path.name.endswith("_volumes.tsv"):
            raise KeyboardInterrupt  # as a job killed while writing
        return write(path, text)

    monkeypatch.setattr(participant, "atomic_write_text", stop_at_volumes)
    with pytest.raises(KeyboardInterrupt):
        _run([bids, out, *_args(tiny_model, "--no-tta")])
    assert not side.exists()
    monkeypatch.setattr(participant, "atomic_write_text", write)
    assert _run([bids, out, "group"]) == 0
    vol = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    assert "incomplete" in vol.loc[vol["participant_id"] == "sub-02", "qc_flags"].iloc[0]
