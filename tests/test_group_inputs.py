"""Group level: what it reads from the BIDS dataset (``participants.tsv``, ``sessions.tsv``)
and how it picks one row per participant (baseline) or per session (longitudinal change).

The output folder is faked with pandas and json only (no model, no images are read).
"""
import json
import logging

import numpy as np
import pandas as pd
import pytest

from ms3seg_app.cli.run import main
from ms3seg_app.group import GROUP_TABLE, LONG_TABLE, QC_TABLE, baseline, collect_volumes, run_group
from ms3seg_app.longitudinal import longitudinal_changes


def _row(sub: str, ses: str | None = None, run: str | None = None, abnormal: float = 2.0, **values) -> dict:
    row = {"participant_id": f"sub-{sub}", "session_id": f"ses-{ses}" if ses else "n/a", "acq": "n/a",
           "run": run or "n/a", "abnormal_wmh_ml": abnormal, "normal_wmh_ml": 1.0, "ventricles_ml": 20.0,
           "icv_ml": 1400.0, "lesion_count": 3, "lesion_periventricular_share": 0.5,
           "slice_thickness_mm": 6.0, "inplane_mm": 0.9}
    row.update(values)
    for c in ("ventricles", "normal_wmh", "abnormal_wmh"):
        row[f"{c}_icv_fraction"] = row[f"{c}_ml"] / row["icv_ml"]
    row["prefix"] = "_".join([row["participant_id"]] + [f"ses-{ses}"] * bool(ses) + [f"run-{run}"] * bool(run))
    row["flair_source"] = ""
    return row


def _fake_flair(out, sub: str, ses: str | None = None, **values) -> None:
    """Write the tables and the dseg sidecar the participant level writes for one FLAIR."""
    row = _row(sub, ses, **values)
    prefix = row.pop("prefix")
    row.pop("flair_source")
    folder = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}_space-orig_desc-trimask"
    (folder / f"{stem}_volumes.tsv").write_text(pd.DataFrame([row]).to_csv(sep="\t", index=False, na_rep="n/a"))
    rel = folder.relative_to(out).as_posix()
    meta = {"Sources": [], "QCWarnings": [], "Outputs": [f"{rel}/{stem}_volumes.tsv", f"{rel}/{stem}_dseg.json"]}
    (folder / f"{stem}_dseg.json").write_text(json.dumps(meta))


def _dataset(tmp_path, participants: bytes | None = None):
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    if participants is not None:
        (bids / "participants.tsv").write_bytes(participants)
    return bids, out


def _sessions_tsv(bids, sub: str, text: str, encoding: str = "utf-8") -> None:
    (bids / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
    (bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_bytes(text.encode(encoding))


def _table(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])


# defect 1: sessions in order of acquisition (sessions.tsv acq_time), not of their labels

def test_sessions_ordered_by_acq_time_else_by_label_with_a_warning(tmp_path, caplog):
    """sub-01: pre (2020) before post (2021), from its sessions.tsv (BOM, CRLF, fractional
    seconds, time zones); sub-02 has no sessions.tsv: label order (post before pre) and a
    warning that names it and the fix; sub-03's numbered sessions need no warning."""
    bids, out = _dataset(tmp_path)
    for sub, (a, b) in {"01": ("pre", "post"), "02": ("pre", "post"), "03": ("1", "2")}.items():
        _fake_flair(out, sub, a, abnormal=2.0)
        _fake_flair(out, sub, b, abnormal=5.0)
    _sessions_tsv(bids, "01", "\ufeffsession_id\tacq_time\r\nses-post\t2021-03-01T09:00:00Z\r\n"
                  "ses-pre\t2020-03-01T10:00:00.250+01:00\r\n")
    caplog.set_level(logging.WARNING, logger="ms3seg")
    run_group(bids, out, longitudinal=True, report=False)

    long = _table(out / LONG_TABLE).set_index("participant_id")
    assert (long.loc["sub-01", "session_from"], long.loc["sub-01", "session_to"]) == ("ses-pre", "ses-post")
    assert long.loc["sub-01", "delta_abnormal_wmh_ml"] == pytest.approx(3.0)
    assert long.loc["sub-01", "session_order"] == "acq_time"
    assert (long.loc["sub-02", "session_from"], long.loc["sub-02", "session_order"]) == ("ses-post", "label")
    assert (long.loc["sub-03", "session_from"], long.loc["sub-03", "session_order"]) == ("ses-1", "label")
    table = _table(out / GROUP_TABLE)
    assert table.loc[table["participant_id"] == "sub-01", "session_id"].tolist() == ["ses-pre", "ses-post"]
    order_warnings = [r.getMessage() for r in caplog.records if "acq_time" in r.getMessage()]
    assert len(order_warnings) == 1 and "sub-02" in order_warnings[0] and "sessions.tsv" in order_warnings[0]
    assert "sub-01" not in order_warnings[0] and "sub-03" not in order_warnings[0]

    from ms3seg_app.group import order_sessions

    base = baseline(order_sessions(collect_volumes(out), bids)).set_index("participant_id")["session_id"]
    assert base.to_dict() == {"sub-01": "ses-pre", "sub-02": "ses-post", "sub-03": "ses-1"}


@pytest.mark.parametrize("sessions", [
    None,                                                                   # no sessions.tsv
    "session_id\tage\nses-pre\t30\nses-post\t31\n",                         # no acq_time
    "session_id\tacq_time\nses-pre\t2020-01-01\nses-post\tn/a\n",           # one missing
    "session_id\tacq_time\nses-pre\t2020-01-01\nses-post\tlast spring\n",   # one unparseable
    "session_id\tacq_time\nses-pre\t2020-01-01\nses-post\t2020-01-01\n",    # the same time
    "session_id\tacq_time\nses-pre\t2020-01-01\n",                          # a session not listed
    "session_id\tacq_time\nses-pre\t2020-01-01\t1\t2\nses-post\t2021-01-01\n",  # not a table
])
def test_session_order_falls_back_to_labels_with_a_warning(tmp_path, caplog, sessions):
    from ms3seg_app.group import order_sessions

    bids, _ = _dataset(tmp_path)
    if sessions is not None:
        _sessions_tsv(bids, "01", sessions)
    df = pd.DataFrame([_row("01", "pre", abnormal=2.0), _row("01", "post", abnormal=5.0)])
    caplog.set_level(logging.WARNING, logger="ms3seg")
    ordered = order_sessions(df, bids)
    assert ordered["session_id"].tolist() == ["ses-post", "ses-pre"]
    assert set(ordered["session_order"]) == {"label"}
    assert "sub-01" in caplog.text and "acq_time" in caplog.text
    long = longitudinal_changes(df, bids, tmp_path)
    assert (long["session_from"].item(), long["session_order"].item()) == ("ses-post", "label")


# defect 2: one row taken whole, never values of several rows

def test_baseline_and_longitudinal_take_rows_whole(tmp_path):
    """ses-01 has no lesions (periventricular share n/a); ses-02's share must not fill it in.
    Of two FLAIRs of one session (run-1, run-2) the first is compared, all of its values."""
    df = pd.DataFrame([_row("01", "01", abnormal=0.0, lesion_count=0, lesion_periventricular_share=np.nan),
                       _row("01", "02", abnormal=1.5, lesion_count=2, lesion_periventricular_share=0.8)])
    base = baseline(df)
    assert base["session_id"].item() == "ses-01" and base["lesion_count"].item() == 0
    assert np.isnan(base["lesion_periventricular_share"].item())

    runs = pd.DataFrame([_row("01", "01", run="1", abnormal=1.0, normal_wmh_ml=np.nan),
                         _row("01", "01", run="2", abnormal=9.0, normal_wmh_ml=2.0),
                         _row("01", "02", run="1", abnormal=4.0, normal_wmh_ml=3.0)])
    long = longitudinal_changes(runs, tmp_path, tmp_path)
    assert long["delta_abnormal_wmh_ml"].item() == pytest.approx(3.0)   # run-1 of each session
    assert np.isnan(long["delta_normal_wmh_ml"].item())                 # not run-2's 2.0


# defect 3: a participant listed twice in participants.tsv

def test_repeated_participant_keeps_the_first_row(tmp_path, caplog):
    bids, out = _dataset(tmp_path, b"participant_id\tage\tsex\nsub-01\t30\tF\nsub-01\t31\tM\nsub-02\t40\tF\n")
    for sub in ("01", "02"):
        _fake_flair(out, sub)
    caplog.set_level(logging.WARNING, logger="ms3seg")
    run_group(bids, out, longitudinal=False, report=False)
    table = _table(out / GROUP_TABLE)
    assert table["participant_id"].tolist() == ["sub-01", "sub-02"]
    assert table["age"].tolist() == [30, 40] and table["sex"].tolist() == ["F", "F"]
    msg = [r.getMessage() for r in caplog.records if "sub-01" in r.getMessage()]
    assert len(msg) == 1 and "participants.tsv" in msg[0] and "first" in msg[0]


# defect 4: participants.tsv that is not UTF-8, or has no participant_id column

def test_latin1_participants_tsv_is_read_with_a_warning(tmp_path, caplog):
    bids, out = _dataset(tmp_path, "participant_id\tsite\tage\nsub-01\tZürich\t30\nsub-03\tMünchen\t50\n"
                         .encode("latin-1"))
    _fake_flair(out, "01")
    caplog.set_level(logging.WARNING, logger="ms3seg")
    assert main([str(bids), str(out), "group", "--no-reports"]) == 0
    table = _table(out / GROUP_TABLE)
    assert table["site"].tolist() == ["Zürich"] and table["age"].tolist() == [30]
    assert "participants.tsv" in caplog.text and "UTF-8" in caplog.text
    qc = _table(out / QC_TABLE)
    assert "sub-03" in qc["participant_id"].tolist()  # still listed as missing


def test_participants_tsv_without_participant_id_is_ignored_with_a_warning(tmp_path, caplog):
    bids, out = _dataset(tmp_path, b"subject\tage\nsub-01\t30\nsub-09\t50\n")
    _fake_flair(out, "01")
    caplog.set_level(logging.WARNING, logger="ms3seg")
    assert main([str(bids), str(out), "group", "--no-reports"]) == 0
    assert "age" not in _table(out / GROUP_TABLE)
    assert "sub-09" not in _table(out / QC_TABLE)["participant_id"].tolist()
    assert "participants.tsv" in caplog.text and "participant_id" in caplog.text


@pytest.mark.parametrize("by_time", [True, False])
def test_the_trajectory_figure_follows_the_session_order(tmp_path, monkeypatch, by_time):
    """The group figure placed sessions by their labels whatever the order of acquisition; it
    now draws each participant's line in :func:`order_sessions`' order (untested before)."""
    from ms3seg_app.group import order_sessions
    from ms3seg_app.reports import group as report

    bids = tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    if by_time:
        (bids / "sub-01" / "sub-01_sessions.tsv").write_text(
            "session_id\tacq_time\nses-pre\t2020-01-01T00:00:00\nses-post\t2021-01-01T00:00:00\n")
    df = order_sessions(pd.DataFrame([_row("01", "pre", abnormal=1.0), _row("01", "post", abnormal=3.0)]), bids)
    figs = []
    monkeypatch.setattr(report, "png_base64", lambda fig, dpi=80: figs.append(fig) or "")
    items = report.figures(df, pd.DataFrame())
    fig = figs[[item["id"] for item in items].index("longitudinal")]
    ax = fig.axes[0]  # abnormal WMH
    x, y = ax.lines[0].get_data()
    # by acquisition time pre (2020) then post; by label (no numbers) in text order, post first
    want = ["ses-pre", "ses-post"] if by_time else ["ses-post", "ses-pre"]
    assert [t.get_text() for t in ax.get_xticklabels()] == want
    assert list(y[np.argsort(x)]) == ([1.0, 3.0] if by_time else [3.0, 1.0])
