"""Kill-and-resume, concurrent jobs on one output folder, and geometry properties."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ms3seg_app.preprocessing import SliceGeometry
from conftest import phantom_labels

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "bids_example"


def _cmd(out, model, work, *extra):
    return [sys.executable, "-m", "ms3seg_app", str(EXAMPLE), str(out), "participant", "--skull-strip", "none",
            "--skip-bids-validation", "--no-reports", "--model", str(model), "-w", str(work), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_kill_and_resume(tmp_path, tiny_model, sig):
    out, work = tmp_path / "out", tmp_path / "work"
    first = out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_space-orig_desc-trimask_dseg.json"
    proc = subprocess.Popen(_cmd(out, tiny_model, work), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(sig)
    # SIGKILL ends it where it is; SIGTERM unwinds it (cli.run.Terminated): exit status 128 + 15
    assert proc.wait() == (-sig if sig == signal.SIGKILL else 128 + sig), "the job was not stopped by the signal"
    assert first.exists(), "the first FLAIR never finished"
    last = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    assert not last.exists(), "the job had finished every FLAIR: it was not killed mid-run"
    finished = {p: p.read_bytes() for p in first.parent.iterdir()}
    # every file present is complete: NIfTIs load, JSON/TSV parse
    for p in out.rglob("*"):
        if p.is_file() and not p.name.endswith(".tmp") and "logs" not in p.parts:
            if p.name.endswith(".nii.gz"):
                np.asarray(nib.load(str(p)).dataobj)
            elif p.suffix == ".json":
                json.loads(p.read_text())
    rc = subprocess.run(_cmd(out, tiny_model, work), env=_env(), capture_output=True, text=True).returncode
    assert rc == 0
    assert not list(out.rglob("*.tmp"))
    for p, data in finished.items():
        assert p.read_bytes() == data, f"{p.name} changed on resume"
    for sub in ("sub-01/ses-02/anat/sub-01_ses-02", "sub-02/anat/sub-02"):
        assert (out / f"{sub}_space-orig_desc-trimask_dseg.nii.gz").exists()


def test_rerun_gives_byte_identical_outputs(tmp_path, tiny_model):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = subprocess.run(_cmd(out, tiny_model, tmp_path / f"w{out.name}", "--participant-label", "02"),
                           env=_env(), capture_output=True)
        assert r.returncode == 0
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "logs" not in p.parts)
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and "logs" not in p.parts)
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_concurrent_jobs_share_one_output_folder(tmp_path, tiny_model):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd(out, tiny_model, tmp_path / f"w{lab}{ses}", "--participant-label", lab,
                                   *(["--session-label", ses] if ses else [])),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for lab, ses in (("01", "01"), ("01", "02"), ("02", None))]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert (out / "desc-trimask_dseg.tsv").read_text().count("\n") == 5
    assert len(list(out.rglob("*_desc-trimask_dseg.nii.gz"))) == 3
    assert not list(out.rglob("*.tmp"))


def test_two_jobs_racing_on_the_same_subject(tmp_path, tiny_model):
    """A resubmitted task: two jobs on sub-02 into one folder take turns; outputs equal a solo run's."""
    out, solo = tmp_path / "out", tmp_path / "solo"
    procs = [subprocess.Popen(_cmd(out, tiny_model, tmp_path / f"w{i}", "--participant-label", "02"),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    assert subprocess.run(_cmd(solo, tiny_model, tmp_path / "ws", "--participant-label", "02"), env=_env(),
                          capture_output=True).returncode == 0
    assert not list(out.rglob("*.tmp"))
    files = sorted(p.relative_to(solo) for p in (solo / "sub-02").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in (out / "sub-02").rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (solo / rel).read_bytes(), rel
    logs = "".join(p.read_text() for p in (out / "logs").glob("ms3seg_participant_*.log"))
    assert "skipped (outputs complete)" in logs   # the second job waited, then found the work done


def _rotation(ax, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != ax]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@settings(max_examples=25, deadline=None)
@given(perm=st.permutations([0, 1, 2]), flips=st.lists(st.sampled_from([-1, 1]), min_size=3, max_size=3),
       axis=st.integers(0, 2), angle=st.floats(-25, 25))
def test_random_storage_round_trips_world_labels(perm, flips, axis, angle):
    """Any storage order and obliquity: labels sent forward and back land on the same voxels,
    and every stored voxel keeps its world position (same affine, same label)."""
    lab = phantom_labels((40, 36, 8), seed=3)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    aff[:3, :3] = _rotation(axis, angle) @ aff[:3, :3]
    base = nib.Nifti1Image(lab, aff)
    ornt = np.array([[perm[i], flips[i]] for i in range(3)], float)
    img = base.as_reoriented(ornt)
    data = np.asarray(img.dataobj)
    geom = SliceGeometry.from_image(img, 1.0, 64, centre_on=data > 0)
    back = geom.inverse(geom.forward(data, order=0).astype(np.float32), order=0).astype(np.uint8)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back, data)
    # world check: the stored image still describes the same world labels as the base image
    ijk = np.argwhere(back > 0)[:50]
    world = nib.affines.apply_affine(img.affine, ijk)
    base_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(base.affine), world)).astype(int)
    np.testing.assert_array_equal(lab[tuple(base_ijk.T)], back[tuple(ijk.T)])
