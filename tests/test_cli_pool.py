"""--nprocs: a worker process that dies fails its FLAIR, not the run; group-level options."""
import os
import shutil
import signal
import textwrap
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from conftest import ROOT

EXAMPLE = ROOT / "bids_example"

# Imported at the start of every Python process given this folder in PYTHONPATH, so also by
# the spawned workers (a monkeypatch in the test process does not reach them): the worker
# that gets the FLAIR of $MS3SEG_TEST_KILL ends as the out-of-memory killer leaves it.
HOOK = textwrap.dedent("""\
    import os
    if os.environ.get("MS3SEG_TEST_KILL"):
        import ms3seg_app.participant as P
        _orig = P.process_flair
        def process_flair(fi, *a, **k):
            if os.environ["MS3SEG_TEST_KILL"] in str(fi.path):
                os._exit(137)
            return _orig(fi, *a, **k)
        P.process_flair = process_flair
""")


def _log_text(out: Path, level: str = "participant") -> str:
    return "".join(p.read_text() for p in sorted((out / "logs").glob(f"ms3seg_{level}_*.log")))


def test_dead_worker_fails_its_flair_and_the_others_are_processed(tmp_path, tiny_model, monkeypatch):
    from ms3seg_app.cli.run import main

    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("MS3SEG_TEST_KILL", "sub-02_FLAIR")
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--skull-strip", "none", "--skip-bids-validation", "--device",
               "cpu", "--no-reports", "--model", str(tiny_model), "--nprocs", "2", "--omp-nthreads", "1"])
    log = _log_text(out)
    assert rc == 1, log[-3000:]
    for ses in ("01", "02"):  # processed although sub-02's worker died
        assert (out / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_space-orig_desc-trimask_dseg.json").is_file()
    assert not (out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json").exists()
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert len(crash) == 1, sorted(p.name for p in (out / "logs").iterdir())
    last = [ln for ln in crash[0].read_text().splitlines() if ln.strip()][-1]
    assert "worker process died" in last and "exit code 137" in last and "--nprocs" in last, last
    assert "finished: 2 succeeded, 1 failed" in log
    assert "sub-02: FAILED: worker process died" in log
    assert "internal error" not in log and "BrokenProcessPool" not in log.split("finished:")[-1]
    assert not list((out / "logs").glob("crash-sub-01*"))

    from ms3seg_app.group import missing_and_failed
    import pandas as pd

    qc = missing_and_failed(out, bids, pd.DataFrame({"prefix": ["sub-01_ses-01", "sub-01_ses-02"],
                                                    "participant_id": ["sub-01", "sub-01"]}))
    assert list(qc["flair"]) == ["sub-02"] and "worker process died" in qc["problem"].iloc[0]


class _FI:
    def __init__(self, sub):
        self.entities = {"subject": sub}
        self.path = Path(f"/data/sub-{sub}/anat/sub-{sub}_FLAIR.nii.gz")


def _broken() -> Future:
    f = Future()
    f.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    return f


def test_sorting_out_a_broken_pool(tmp_path):
    """Attribution after a pool broke: the dead worker's FLAIR fails; a FLAIR whose worker the
    pool stopped is retried once, then failed; one that never started is resubmitted."""
    from ms3seg_app.cli.run import _sort_out_broken_pool

    fis = {s: _FI(s) for s in ("a", "b", "c", "d")}
    ok = Future()
    ok.set_result(("sub-d", "result", None, None))
    pending = {_broken(): (fis["a"], "sha-a"), _broken(): (fis["b"], "sha-b"), _broken(): (fis["c"], "sha-c"),
               ok: (fis["d"], "sha-d")}
    (tmp_path / "sub-a.pid").write_text("101")  # a's worker died (SIGKILL)
    (tmp_path / "sub-b.pid").write_text("102")  # b's worker was stopped by the pool (SIGTERM)
    codes = {101: -signal.SIGKILL, 102: -signal.SIGTERM, 103: -signal.SIGTERM}
    breaks: dict = {}
    finished, died, retry = _sort_out_broken_pool(pending, tmp_path, codes, breaks)
    assert finished == [("sub-d", "result", None, None)]
    assert [(p, fi.path.name) for p, fi, _ in died] == [("sub-a", "sub-a_FLAIR.nii.gz")]
    assert "killed by signal SIGKILL" in died[0][2]
    assert [fi.entities["subject"] for fi, _ in retry] == ["b", "c"]
    assert not list(tmp_path.glob("*.pid"))  # markers are consumed
    # b in flight at a second break, its worker's status unknown: failed, not retried again
    (tmp_path / "sub-b.pid").write_text("202")
    finished, died, retry = _sort_out_broken_pool({_broken(): (fis["b"], "sha-b")}, tmp_path, {}, breaks)
    assert finished == [] and retry == [] and [p for p, _, _ in died] == ["sub-b"]
    assert "twice" in died[0][2]


@pytest.mark.parametrize("flag", [["--participant-label", "01"], ["--session-label", "01"],
                                  ["--participant-label", "01", "--session-label", "02"]])
def test_group_rejects_participant_level_selection(tmp_path, capsys, flag):
    from ms3seg_app.cli.parser import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args([str(EXAMPLE), str(tmp_path / "out"), "group", *flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "participant-level" in err and flag[0] in err, err
    assert not (tmp_path / "out").exists()


def test_group_rejects_a_filter_file(tmp_path, capsys):
    from ms3seg_app.cli.parser import parse_args

    filt = tmp_path / "filter.json"
    filt.write_text('{"flair": {"acquisition": "ax"}}')
    with pytest.raises(SystemExit) as exc:
        parse_args([str(EXAMPLE), str(tmp_path / "out"), "group", "--bids-filter-file", str(filt)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bids-filter-file is a participant-level option" in err, err


def test_group_no_reports_writes_no_group_html(tmp_path, monkeypatch):
    """--no-reports at group level is honoured: the tables, no group.html."""
    from ms3seg_app.cli import run

    seen = {}

    def fake_run_group(bids_dir, output_dir, longitudinal=True, report=True):
        seen["report"] = report
        (output_dir / "group_desc-trimask_volumes.tsv").write_text("participant_id\nsub-01\n")
        (output_dir / "group_desc-trimask_qc.tsv").write_text("")
        if report:
            (output_dir / "group.html").write_text("<html></html>")
        return output_dir / "group_desc-trimask_volumes.tsv"

    monkeypatch.setattr("ms3seg_app.group.run_group", fake_run_group)
    out = tmp_path / "out"
    assert run.main([str(EXAMPLE), str(out), "group", "--no-reports"]) == 0
    assert seen == {"report": False} and not (out / "group.html").exists()
    log = _log_text(out, "group")
    assert "group.html" not in log.split("group: tables")[-1] and "--no-reports" in log
    assert run.main([str(EXAMPLE), str(out), "group"]) == 0
    assert seen == {"report": True} and (out / "group.html").exists()
    for old in (out / "logs").glob("ms3seg_group_*.log"):
        old.unlink()
    assert run.main([str(EXAMPLE), str(out), "group", "--no-reports"]) == 0  # an older group.html is not silent
    assert "is from an earlier group run" in _log_text(out, "group")


def test_threads_follow_the_cpus_the_task_may_use_not_the_node(tmp_path, tiny_model, monkeypatch):
    """A cluster task bound to 1 CPU of a 64-core node (SLURM's affinity) runs 1 thread per
    FLAIR, in TensorFlow, OpenMP and ITK (ANTsPy), not 64."""
    import json
    import os

    from ms3seg_app.cli.run import main

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        monkeypatch.setenv(var, "")  # restored after the test: select_device sets them
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--participant-label", "02", "--skull-strip", "none",
               "--skip-bids-validation", "--device", "cpu", "--no-reports", "--model", str(tiny_model)])
    assert rc == 0, _log_text(out)[-3000:]
    config = json.loads(next((out / "logs").glob("config-*.json")).read_text())
    assert config["threads_per_flair"] == 1
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        assert os.environ[var] == "1", var
