"""Cluster and container conditions: SIGTERM (time limits, docker stop), no writable temporary
folder, a full disk, the umask of a group-shared folder, ANTsPy's transform files, the SLURM
script, worker processes' log records and their end with the main process."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT

EXAMPLE = ROOT / "bids_example"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _log_text(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "logs").glob("ms3seg_participant_*.log")))


def _run_args(bids: Path, out: Path, model: Path, *extra: str) -> list:
    return [str(bids), str(out), "participant", "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu",
            "--model", str(model), *extra]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """TMPDIR in this test's folder (Python's temporary files and work folders land there)."""
    t = tmp_path / "tmpdir"
    t.mkdir()
    monkeypatch.setenv("TMPDIR", str(t))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return t


def test_sigterm_stops_a_serial_run_cleanly(tmp_path, tiny_model, monkeypatch, private_tmp):
    """SIGTERM mid-FLAIR (SLURM's time limit): exit 143 with one line, the work folder removed,
    no output of that FLAIR; before, Python died at once and left the work folder behind."""
    import ms3seg_app.participant as P
    from ms3seg_app.cli.run import main

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(P, "process_flair", killed)
    before = signal.getsignal(signal.SIGTERM)
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(_run_args(bids, out, tiny_model, "--participant-label", "02", "--no-reports"))
    assert rc == 143 and time.perf_counter() - t0 < 50, _log_text(out)[-2000:]
    assert "stopped by SIGTERM" in _log_text(out)
    assert not list(private_tmp.glob("ms3seg_work_*"))
    assert not (out / "sub-02" / "anat").exists() or not list((out / "sub-02" / "anat").glob("*_dseg.json"))
    assert signal.getsignal(signal.SIGTERM) == before  # the test process's own handler is back


# In the spawned workers (PYTHONPATH): the worker of $MS3SEG_TEST_TERM's FLAIR logs a line, sends
# SIGTERM to the main process (as SLURM would) and keeps working, as a long FLAIR does.
HOOK = textwrap.dedent("""\
    import os
    if os.environ.get("MS3SEG_TEST_TERM"):
        import logging, signal, time
        import ms3seg_app.participant as P
        _orig = P.process_flair
        def process_flair(fi, *a, **k):
            if os.environ["MS3SEG_TEST_TERM"] in str(fi.path):
                logging.getLogger("ms3seg.participant").warning("worker %d says hello", os.getpid())
                with open(os.environ["MS3SEG_TEST_PIDS"], "a") as fh:
                    fh.write(f"{os.getpid()}\\n")
                time.sleep(0.5)  # the record is on its way (the queue's feeder thread)
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(120)
            return _orig(fi, *a, **k)
        P.process_flair = process_flair
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_worker_processes_and_workers_log_to_the_run(tmp_path, tiny_model, monkeypatch):
    """With --nprocs 2, SIGTERM ends the run at once and its workers with it (before, they
    were left running as orphans, holding ~1 GB each); a worker's log record reaches the
    run's log (before, only logs/native_*.log)."""
    from ms3seg_app.cli.run import main

    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("MS3SEG_TEST_TERM", "sub-02_FLAIR")
    monkeypatch.setenv("MS3SEG_TEST_PIDS", str(pids))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(_run_args(bids, out, tiny_model, "--no-reports", "--nprocs", "2", "--omp-nthreads", "1"))
    log = _log_text(out)
    assert rc == 143 and time.perf_counter() - t0 < 100, log[-3000:]
    assert "stopped by SIGTERM" in log and "says hello" in log
    worker = int(pids.read_text().split()[0])
    assert not _alive(worker)


CHILD = textwrap.dedent("""\
    import multiprocessing as mp, os, sys, time
    from ms3seg_app.cli.run import _exit_with

    def grandchild():
        import threading
        threading.Thread(target=_exit_with, args=(mp.parent_process(),), daemon=True).start()
        time.sleep(120)

    if __name__ == "__main__":
        p = mp.get_context("spawn").Process(target=grandchild)
        p.start()
        print(p.pid, flush=True)
        time.sleep(1)
        os._exit(9)  # as if killed with SIGKILL: no clean-up of its children
""")


def test_a_worker_ends_when_the_main_process_is_killed(tmp_path):
    """A worker whose main process was killed (SIGKILL: no handler runs) ends by itself."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=120)
    pid = int(r.stdout.split()[0])
    deadline = time.time() + 30
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), r.stderr[-2000:]


def test_no_writable_tempdir_is_a_usage_error_or_uses_the_work_folder(tmp_path, monkeypatch):
    """A read-only container without --tmpfs /tmp: exit 2 with what to do (was exit 70, "this
    is a bug"); with -w, temporary files go to the work folder."""
    from ms3seg_app.cli.run import ensure_tempdir, main

    def gettempdir():  # as tempfile's, when no candidate folder is writable
        if tempfile.tempdir is None and str(tmp_path) in os.environ.get("TMPDIR", ""):
            tempfile.tempdir = os.environ["TMPDIR"]
        if tempfile.tempdir is None:
            raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp', '/var/tmp']")
        return tempfile.tempdir

    monkeypatch.setattr(tempfile, "gettempdir", gettempdir)
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", "/nonexistent")
    out = tmp_path / "out"
    rc = main([str(EXAMPLE), str(out), "participant", "--participant-label", "02", "--skip-bids-validation"])
    assert rc == 2
    log = _log_text(out)
    assert "no writable folder for temporary files" in log and "TMPDIR" in log and "bug" not in log
    ensure_tempdir(tmp_path / "work")
    assert tempfile.gettempdir() == str(tmp_path / "work" / "tmp") and (tmp_path / "work" / "tmp").is_dir()


def test_full_disk_while_writing_the_report_fails_the_flair_with_what_to_do(tmp_path, tiny_model, monkeypatch):
    """No space left for the report: the FLAIR fails (exit 1), is not complete (the next run
    redoes it), and its line says to free space; before, the run ended 0 with a traceback."""
    import ms3seg_app.reports.individual as R
    from ms3seg_app.cli.run import _error_line, main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(R, "write_participant_report", full)
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    out = tmp_path / "out"
    rc = main(_run_args(bids, out, tiny_model, "--participant-label", "02"))
    log = _log_text(out)
    assert rc == 1, log[-2000:]
    line = next(ln for ln in log.splitlines() if "sub-02: FAILED" in ln)
    assert "No space left on device" in line and "free space" in line and "bug" not in line
    assert not list(out.rglob("sub-02*_dseg.json"))
    quota = _error_line(OSError(errno.EDQUOT, "Disk quota exceeded", "/out/sub-01/anat/x.nii.gz"))
    assert "/out/sub-01/anat/x.nii.gz" in quota and "quota" in quota and "bug" not in quota
    assert "bug" in _error_line(ValueError("x"))

    class ResourceExhaustedError(Exception):  # as TensorFlow names its out-of-memory error
        pass

    for oom in (MemoryError(), ResourceExhaustedError("OOM when allocating tensor")):
        assert _error_line(oom).startswith("out of memory") and "bug" not in _error_line(oom)


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o077, 0o600), (0o022, 0o644)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    """A lab's group-shared folder (umask 002) gets group-writable outputs, a private one (077)
    private outputs; before, every output was 0644."""
    p = tmp_path / "x.tsv"
    code = (f"import os; os.umask({umask}); from ms3seg_app.derivatives import atomic_write_text; "
            f"atomic_write_text({str(p)!r}, 'x'); print(oct(os.stat({str(p)!r}).st_mode & 0o777))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.stdout.strip() == oct(mode), r.stderr[-2000:]


def test_ants_coregistration_leaves_no_transform_files_behind(tmp_path, private_tmp):
    """ANTsPy wrote each registration's transform (…GenericAffine.mat) to the system's temporary
    folder and left it there; now it is written in a folder that is removed."""
    from ms3seg_app.stages.registration import coregister_to_flair

    g = np.indices((40, 40, 30)).astype(np.float32)
    blob = np.exp(-(((g[0] - 20) / 9) ** 2 + ((g[1] - 18) / 11) ** 2 + ((g[2] - 15) / 7) ** 2)) * 1000
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    flair = nib.Nifti1Image(blob, aff)
    t1 = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.roll(blob, 2, axis=0), aff), str(t1))
    (tmp_path / "work").mkdir()
    img, used = coregister_to_flair(t1, flair, method="ants", work_dir=tmp_path / "work")
    assert used == "antspy-rigid" and img.shape == flair.shape
    assert not list(private_tmp.rglob("*")), sorted(p.name for p in private_tmp.rglob("*"))


def test_device_auto_with_worker_processes_leaves_tensorflow_to_them():
    """The main process of an --nprocs run does not import TensorFlow to list GPUs (0.6 GB)."""
    code = ("import sys; from ms3seg_app.cli.run import select_device; "
            "print(select_device('auto', 1, query=False), 'tensorflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.stdout.split() == ["auto", "False"], r.stderr[-2000:]


def test_slurm_script_runs_every_participant(tmp_path):
    """participants.tsv without its last newline, with Windows line ends and a blank line: the
    array size counts every participant (wc -l missed the last one) and task N runs the N-th;
    the task's work folder is removed even when ms3seg fails."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_bytes(b"participant_id\tage\r\nsub-01\t30\r\n\r\nsub-02\t40")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "singularity").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args.txt\nexit 1\n')
    (fake / "singularity").chmod(0o755)
    script = ROOT / "scripts" / "slurm_ms3seg.sh"
    env = {**os.environ, "BIDS": str(bids), "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path / "t"),
           "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}
    env.pop("SLURM_TMPDIR", None)
    count = subprocess.run(["bash", str(script), "count"], capture_output=True, text=True, env=env, timeout=60)
    assert count.stdout.strip() == "2", count.stderr
    r = subprocess.run(["bash", str(script), "participant"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    args = (tmp_path / "args.txt").read_text().split()
    assert args[args.index("--participant-label") + 1] == "02"
    assert not (tmp_path / "t" / "ms3seg_work_7_2").exists()


def test_one_participant_is_indexed_alone_with_the_same_inputs(tmp_path):
    """An array task for one participant indexes that participant's folder only (pybids
    ``ignore``), with the same inputs as from the whole dataset; a participant whose label is
    a prefix of another's (1 and 10) is not mixed up; an unknown one is refused with the
    dataset's participants listed."""
    from ms3seg_app.bids import collect_inputs
    from ms3seg_app.exceptions import InputDataError

    ds = tmp_path / "bids"
    shutil.copytree(EXAMPLE, ds)
    for src, dst in (("sub-01", "sub-1"), ("sub-02", "sub-10")):
        shutil.copytree(ds / src, ds / dst)
        for p in sorted((ds / dst).rglob("*"), key=lambda p: -len(p.parts)):
            p.rename(p.with_name(p.name.replace(src, dst)))
    import bids.layout

    seen = []
    indexer = bids.layout.BIDSLayoutIndexer

    def recording(*a, **k):
        seen.append(k.get("ignore") or [])
        return indexer(*a, **k)

    whole, _ = collect_inputs(ds)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bids.layout, "BIDSLayoutIndexer", recording)
        collect_inputs(ds, ["01"])
    skipped = [p for p in seen[-1] if hasattr(p, "search")]
    assert any(p.search("/sub-02/anat") for p in skipped) and not any(p.search("/sub-01/anat") for p in skipped)
    for label in ("01", "1", "10"):
        alone, _ = collect_inputs(ds, [label])
        assert [(f.path, f.t1w, f.metadata) for f in alone] == \
            [(f.path, f.t1w, f.metadata) for f in whole if f.entities["subject"] == label]
    from ms3seg_app.bids import index_ignore

    layout = bids.layout.BIDSLayout(str(ds), validate=False, indexer=bids.layout.BIDSLayoutIndexer(
        validate=False, index_metadata=False, ignore=index_ignore(["1"])))
    assert layout.get_subjects() == ["1"]
    with pytest.raises(InputDataError, match=r"not found.*available: \['01', '02', '1', '10'\]"):
        collect_inputs(ds, ["99"])
