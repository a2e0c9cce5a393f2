"""Container smoke test (issue 5): build the Dockerfile without a Docker engine, run it
read-only and non-root on bids_example, and compare with a run outside the container.

Opt-in (it builds an image of ~3 GB and needs root, network and Debian's debootstrap,
buildah, podman and runc): ``MS3SEG_CONTAINER_TEST=1 python -m pytest tests/test_container.py``.
``.ci/run`` installs the tools and runs it, time-boxed, after the main test command.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("debootstrap", "buildah", "podman", "runc")

pytestmark = [
    pytest.mark.skipif(os.environ.get("MS3SEG_CONTAINER_TEST") != "1",
                       reason="container smoke test is opt-in: set MS3SEG_CONTAINER_TEST=1 "
                              "(needs root, network, debootstrap, buildah, podman, runc; .ci/run does)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or os.geteuid() != 0,
                       reason=f"container smoke test needs root and {', '.join(TOOLS)}"),
]


def _files(folder: Path) -> set[str]:
    """Output files, without logs/ (their names carry the run's time and id)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] != "logs"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(container derivatives, native derivatives, container log folder)."""
    base = tmp_path_factory.mktemp("container")
    bids = base / "bids"
    shutil.copytree(ROOT / "bids_example", bids)
    os.chmod(base, 0o755)
    subprocess.run([str(ROOT / "scripts" / "container_smoke.sh"), str(base / "container"), str(bids)],
                   check=True, timeout=3600)
    native = base / "native"
    exe = [sys.executable, "-m", "ms3seg_app.cli.run"]
    for level in ("participant", "group"):
        args = [str(bids), str(native), level] + (["--nprocs", "1"] if level == "participant" else [])
        subprocess.run(exe + args, check=True, timeout=1200)
    return base / "container" / "derivatives", native, base / "container"


def test_container_reports_version_and_no_fsl(runs):
    _, _, logs = runs
    text = (logs / "version.txt").read_text()
    from ms3seg_app.model.card import load_card

    assert text.startswith("ms3seg-app ") and load_card().sha256 in text
    assert "FSL" in text and "not found" in text.split("FSL", 1)[1].splitlines()[0]


def test_container_outputs_match_native_run(runs):
    container, native, _ = runs
    cfiles, nfiles = _files(container), _files(native)
    assert cfiles == nfiles, (sorted(cfiles ^ nfiles))
    assert any(f.endswith("_desc-trimask_dseg.nii.gz") for f in cfiles)
    assert any((container / "logs").glob("ms3seg_participant_*.log"))
    for rel in sorted(cfiles):
        c, n = container / rel, native / rel
        if rel.endswith(".nii.gz"):
            ci, ni = nib.load(c), nib.load(n)
            assert ci.shape == ni.shape, rel
            np.testing.assert_allclose(ci.affine, ni.affine, atol=1e-6, err_msg=rel)
            a, b = np.asarray(ci.dataobj), np.asarray(ni.dataobj)
            assert a.dtype == b.dtype, rel
            if rel.endswith("_dseg.nii.gz") or rel.endswith("_mask.nii.gz"):
                # identical here; allow a few voxels for another CPU's code path
                assert np.mean(a != b) < 1e-3, (rel, int((a != b).sum()))
            elif "_desc-coreg_" in rel:
                # ANTs' multi-threaded Mattes metric is not bit-reproducible between
                # environments: the transforms differ at the 1e-4 level (r = 1.000000 seen)
                assert np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1] > 0.999, rel
            else:  # probabilities: the same TensorFlow release (identical bytes seen)
                np.testing.assert_allclose(a, b, atol=0.02, err_msg=rel)
        elif rel.endswith("_volumes.tsv") or rel.startswith("group_desc-") and rel.endswith(".tsv"):
            dc, dn = pd.read_csv(c, sep="\t"), pd.read_csv(n, sep="\t")
            assert list(dc.columns) == list(dn.columns), rel
            assert len(dc) == len(dn), rel
            num = dc.select_dtypes("number").columns
            np.testing.assert_allclose(dc[num].to_numpy(float), dn[num].to_numpy(float),
                                       rtol=0.02, atol=0.05, err_msg=rel)
        elif rel.endswith(".json"):
            jc, jn = json.loads(c.read_text()), json.loads(n.read_text())
            assert set(jc) == set(jn), rel


def test_container_wrote_reports_and_group_table(runs):
    container, _, logs = runs
    assert (container / "group.html").is_file()
    assert (container / "group_desc-trimask_volumes.tsv").is_file()
    assert len(list(container.glob("sub-*.html"))) == 3
    log = (logs / "participant.log").read_text()
    assert "3 succeeded, 0 failed" in log and "Traceback" not in log
