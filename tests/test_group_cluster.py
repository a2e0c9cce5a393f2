"""Group level after cluster jobs: participant tasks that were killed, or are still running,
when the group level runs (array jobs finish at different times).

The output folders are faked with pandas and json only (no model, no images are read); the
BIDS FLAIRs are empty files (only their paths count).
"""
import json
from pathlib import Path

import pandas as pd

import ms3seg_app.group as group
from ms3seg_app.derivatives import crash_log_path, resolve_crash_logs
from ms3seg_app.group import QC_TABLE, add_qc_flags, collect_volumes, missing_and_failed, run_group
from ms3seg_app.participant import flair_lock

MODEL = "a" * 64


def _bids(tmp_path: Path, flairs: dict[str, list[str | None]]) -> Path:
    """A BIDS dataset with one empty FLAIR per participant and session (``None``: no session)."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (bids / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"sub-{s}\t40\n" for s in flairs))
    for sub, sessions in flairs.items():
        for ses in sessions:
            _flair(bids, sub, ses).parent.mkdir(parents=True, exist_ok=True)
            _flair(bids, sub, ses).write_bytes(b"")
    return bids


def _flair(bids: Path, sub: str, ses: str | None = None) -> Path:
    folder = bids / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    return folder / (f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_FLAIR.nii.gz")


def _result(out: Path, bids: Path, sub: str, ses: str | None = None, sidecar: bool = True,
            model: str = MODEL) -> str:
    """What the participant level writes for one FLAIR (volumes table, then the dseg sidecar last);
    ``sidecar=False``: a FLAIR whose run is still going (or was killed) after its tables. Returns
    the FLAIR's prefix."""
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    folder = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    row = {"participant_id": f"sub-{sub}", "session_id": f"ses-{ses}" if ses else "n/a", "acq": "n/a",
           "run": "n/a", "abnormal_wmh_ml": 2.0, "normal_wmh_ml": 1.0, "ventricles_ml": 20.0, "icv_ml": 1400.0,
           "lesion_count": 3, "slice_thickness_mm": 6.0, "inplane_mm": 0.9}
    for c in ("ventricles", "normal_wmh", "abnormal_wmh"):
        row[f"{c}_icv_fraction"] = row[f"{c}_ml"] / row["icv_ml"]
    stem = f"{prefix}_space-orig_desc-trimask"
    (folder / f"{stem}_volumes.tsv").write_text(pd.DataFrame([row]).to_csv(sep="\t", index=False))
    rel = folder.relative_to(out).as_posix()
    if sidecar:
        source = _flair(bids, sub, ses).relative_to(bids).as_posix()
        (folder / f"{stem}_dseg.json").write_text(json.dumps({
            "Sources": [f"bids:raw:{source}"], "ModelSHA256": model, "QCWarnings": [], "InferenceCrop": "head",
            "Outputs": [f"{rel}/{stem}_volumes.tsv", f"{rel}/{stem}_dseg.json"]}))
    return prefix


def _config(out: Path, bids: Path, run: str, inputs: list[Path]) -> None:
    """``logs/config-<run>.json`` as a participant-level run writes it before processing."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"config-{run}.json").write_text(json.dumps(
        {"version": "test", "bids_dir": str(bids), "inputs": [str(p) for p in inputs]}))


def _qc(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / QC_TABLE, sep="\t", keep_default_na=False)


# defect 1: a FLAIR whose participant-level task was killed before writing anything

def test_selected_flair_without_any_result_is_listed_once(tmp_path):
    """sub-01: ses-1 finished, ses-2's task was killed before writing anything; sub-02: its
    FLAIR failed (crash log) and is listed once, as failed; sub-03: killed, its only FLAIR
    listed (not also as a participant without results); sub-04: selected, then removed from
    the dataset: nothing is expected for it."""
    bids = _bids(tmp_path, {"01": ["1", "2"], "02": ["1"], "03": [None]})
    out = tmp_path / "out"
    _result(out, bids, "01", "1")
    gone = _flair(bids, "04")
    _config(out, bids, "aaaa-1111", [_flair(bids, "01", "1"), _flair(bids, "01", "2"), gone])
    _config(out, bids, "bbbb-2222", [_flair(bids, "02", "1"), _flair(bids, "03"), _flair(bids, "01", "2")])
    crash = crash_log_path(out, "sub-02_ses-1", "bbbb-2222")
    crash.write_text("Traceback (most recent call last):\nValueError: broken FLAIR\n")

    run_group(bids, out, longitudinal=False, report=False)
    qc = _qc(out)
    rows = qc.set_index("flair")["problem"].to_dict()
    assert "sub-01_ses-2" in rows, qc
    assert rows["sub-01_ses-2"].startswith("no result: its participant-level run did not finish")
    assert "--participant-label 01" in rows["sub-01_ses-2"]
    assert "sub-01_ses-1" not in rows
    assert qc["flair"].tolist().count("sub-02_ses-1") == 1 and rows["sub-02_ses-1"].startswith("failed: ValueError")
    assert qc.loc[qc["participant_id"] == "sub-03", "flair"].tolist() == ["sub-03"]
    assert rows["sub-03"].startswith("no result")
    assert "sub-04" not in set(qc["participant_id"])
    assert list(qc["flair"]) == ["sub-01_ses-2", "sub-02_ses-1", "sub-03"]  # by participant


# defect 2: a group run while participant tasks are still running

def test_incomplete_rows_take_no_part_in_the_model_vote(tmp_path):
    """One complete FLAIR and one whose tables are written but not yet its sidecar: a tie of
    models ("" against the model's sha256) flagged the complete one."""
    bids = _bids(tmp_path, {"01": [None], "02": [None]})
    out = tmp_path / "out"
    _result(out, bids, "01")
    _result(out, bids, "02", sidecar=False)
    df = add_qc_flags(collect_volumes(out)).set_index("participant_id")
    assert not df.loc["sub-01", "qc_model_differs"], df["qc_flags"].to_dict()
    assert not df.loc["sub-02", "qc_model_differs"]
    assert df.loc["sub-01", "qc_flags"] == ""
    assert df.loc["sub-02", "qc_flags"].startswith("incomplete (missing ")  # no lock held: a killed run

    # among the complete rows the vote still works: a minority model is flagged, incomplete rows aside
    _result(out, bids, "03")
    _result(out, bids, "04", model="b" * 64)
    _result(out, bids, "05", sidecar=False)
    flags = add_qc_flags(collect_volumes(out)).set_index("participant_id")["qc_model_differs"].to_dict()
    assert flags == {"sub-01": False, "sub-02": False, "sub-03": False, "sub-04": True, "sub-05": False}


def test_flair_whose_lock_is_held_is_reported_as_being_processed(tmp_path):
    """sub-02's tables are written, its sidecar not yet, and a participant process holds its lock;
    sub-03 was selected and is being processed before any table; sub-04's lock file is left by a
    killed job (the kernel dropped the lock): incomplete, re-run. Lock files are neither
    created nor deleted by the group level."""
    bids = _bids(tmp_path, {"01": [None], "02": [None], "03": [None], "04": [None]})
    out = tmp_path / "out"
    _result(out, bids, "01")
    _result(out, bids, "02", sidecar=False)
    _result(out, bids, "04", sidecar=False)
    _config(out, bids, "cccc-3333", [_flair(bids, s) for s in ("01", "02", "03", "04")])
    locks = out / "logs" / "locks"
    with flair_lock(out, "sub-04"):  # left behind, unlocked, as by a killed job
        pass
    with flair_lock(out, "sub-02"), flair_lock(out, "sub-03"):
        run_group(bids, out, longitudinal=False, report=False)
    rows = _qc(out).set_index("flair")["problem"].to_dict()
    being = "being processed (its participant-level run holds the lock): run the group level again when it has finished"
    assert rows["sub-02"] == being, rows
    assert rows["sub-03"] == being
    assert rows["sub-04"].startswith("incomplete (missing sub-04/anat/sub-04_space-orig_desc-trimask_dseg.json)")
    assert "sub-01" not in rows
    assert sorted(p.name for p in locks.iterdir()) == ["sub-02.lock", "sub-03.lock", "sub-04.lock"]
    with flair_lock(out, "sub-02"):  # released by the group level: not blocked
        pass


def test_crash_log_resolved_while_read(tmp_path, monkeypatch):
    """A participant run moves a crash log to logs/resolved/ just as the group level reads it."""
    bids = _bids(tmp_path, {"01": [None], "02": [None]})
    out = tmp_path / "out"
    _result(out, bids, "01")
    _result(out, bids, "02")
    (out / "logs").mkdir()
    crash_log_path(out, "sub-01", "dddd-4444").write_text("ValueError: once\n")
    crash_log_path(out, "sub-02", "eeee-5555").write_text("ValueError: still failing\n")
    real = group.prefix_from_crash_log

    def resolved_meanwhile(path):
        prefix = real(path)
        if prefix == "sub-01":
            resolve_crash_logs(out, prefix)  # the participant run that just succeeded
        return prefix

    monkeypatch.setattr(group, "prefix_from_crash_log", resolved_meanwhile)
    df = collect_volumes(out)
    df["qc_incomplete"] = True  # as if read before the reruns finished: crash logs are not skipped as older
    qc = missing_and_failed(out, bids, df)
    assert qc["flair"].tolist() == ["sub-02"] and qc["problem"].tolist() == ["failed: ValueError: still failing"]
    assert (out / "logs" / "resolved" / "crash-sub-01-dddd-4444.txt").is_file()
