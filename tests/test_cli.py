"""Command line: usage errors (exit 2), label safety, end to end on bids_example."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ms3seg_app.cli.parser import parse_args
from ms3seg_app.cli.run import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "bids_example"


@pytest.mark.parametrize("argv", [
    ["bids_example", "out", "participant", "--participant-label", "../x"],
    ["bids_example", "out", "participant", "--participant-label", "a/b"],
    ["bids_example", "out", "participant", "--session-label", "1;rm"],
    ["bids_example", "out", "wrong-level"],
    ["does_not_exist", "out", "participant"],
    ["bids_example", "bids_example/derivatives/x", "participant"],
    ["bids_example", "bids_example", "participant"],
])
def test_usage_errors_exit_2(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_bids_dir_inside_output_refused(tmp_path):
    bids = tmp_path / "out" / "bids"
    shutil.copytree(EXAMPLE, bids)
    with pytest.raises(SystemExit) as exc:
        parse_args([str(bids), str(tmp_path / "out"), "participant"])
    assert exc.value.code == 2


def test_labels_strip_prefix(monkeypatch):
    monkeypatch.chdir(ROOT)
    o = parse_args(["bids_example", "/tmp/ms3seg-x", "participant", "--participant-label", "sub-01", "02"])
    assert o.participant_label == ["01", "02"]


def test_help_and_version(capsys):
    for flag in ("--help", "--version"):
        with pytest.raises(SystemExit) as exc:
            parse_args([flag])
        assert exc.value.code == 0
    assert "ms3seg-app" in capsys.readouterr().out


def test_command_exits_fast_without_changing_main(monkeypatch, tmp_path):
    """``ms3seg`` and ``python -m ms3seg_app`` run command(): main's exit code, then gc.freeze()
    so that the interpreter's teardown skips the objects of TensorFlow (0.9 s per process);
    main() itself, called in-process by tests and programs, does not freeze the collector."""
    import gc
    from importlib.metadata import entry_points

    import ms3seg_app.cli.run as run

    assert entry_points(group="console_scripts")["ms3seg"].value == "ms3seg_app.cli.run:command"
    assert "command()" in (ROOT / "ms3seg_app" / "__main__.py").read_text()
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    assert run.main([str(EXAMPLE), str(tmp_path / "empty"), "group"]) == 1  # a run to its end
    assert frozen == []  # main() alone leaves the collector as it is
    monkeypatch.setattr(run, "main", lambda argv=None: 3)
    assert run.command([]) == 3 and frozen == [True]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deriv")
    rc = main([str(EXAMPLE), str(out), "participant", "--skull-strip", "none", "--device", "cpu"])
    return rc, out


def test_end_to_end_outputs_and_geometry(example_run):
    rc, out = example_run
    assert rc == 0
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "logs"]
    listing = sorted(str(p) for p in files if p.parts[0] != "models")
    expected = (ROOT / "tests" / "data" / "expected_outputs.txt").read_text().split()
    assert listing == expected
    from ms3seg_app.model.card import load_card

    cards = [p for p in files if p.parts[0] == "models"]  # the card that was used, named by its hash
    assert len(cards) == 1 and (out / cards[0]).read_bytes() == load_card().path.read_bytes()
    for flair in sorted(EXAMPLE.rglob("*_FLAIR.nii.gz")):
        src = nib.load(str(flair))
        stem = flair.name.replace("_FLAIR.nii.gz", "")
        anat = out / flair.parent.relative_to(EXAMPLE)
        dseg = nib.load(str(anat / f"{stem}_space-orig_desc-trimask_dseg.nii.gz"))
        assert dseg.shape == src.shape
        np.testing.assert_allclose(dseg.affine, src.affine, atol=1e-5)
        assert dseg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(dseg.dataobj))) <= {0, 1, 2, 3}
        probs = [np.asarray(nib.load(str(anat / f"{stem}_space-orig_label-{lab}_probseg.nii.gz")).dataobj)
                 for lab in ("VEN", "NWMH", "AWMH")]
        assert all(p.shape == src.shape for p in probs)
        assert float(np.max(sum(probs))) <= 1.0 + 1e-4
        side = json.loads((anat / f"{stem}_space-orig_desc-trimask_dseg.json").read_text())
        assert len(side["ModelSHA256"]) == 64 and side["Sources"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "ms3seg-app"
    assert (out / "desc-trimask_dseg.tsv").read_text().splitlines()[0] == "index\tname\tabbreviation\tcolor"
    html = (out / "sub-01_ses-01.html").read_text()
    import re

    assert "data:image/png;base64," in html
    # no resource is loaded from the network (the vendored viewer's code comments may hold URLs)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html, re.I)


def test_resume_skips_complete_outputs(example_run):
    rc, out = example_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    assert main([str(EXAMPLE), str(out), "participant", "--participant-label", "02", "--skull-strip", "none",
                 "--skip-bids-validation", "--device", "cpu"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}


def test_group_table_joins_participants(example_run):
    rc, out = example_run
    assert main([str(EXAMPLE), str(out), "group"]) == 0
    import pandas as pd

    df = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    assert list(df["participant_id"]) == ["sub-01", "sub-01", "sub-02"]
    assert list(df["age"]) == [34, 34, 52]
    assert list(df["session_id"]) == ["ses-01", "ses-02", "n/a"]


def test_group_without_results_fails_clearly(tmp_path):
    assert main([str(EXAMPLE), str(tmp_path / "empty"), "group"]) == 1


def test_bad_subject_fails_alone(tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    bad = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated file
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--skull-strip", "none", "--skip-bids-validation",
               "--participant-label", "01", "02", "--no-reports"])
    assert rc == 1
    assert (out / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_space-orig_desc-trimask_dseg.nii.gz").exists()
    assert not list((out / "sub-02").rglob("*")) if (out / "sub-02").exists() else True
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert crash and "sub-02_FLAIR.nii.gz" in crash[0].read_text()


def test_participant_and_session_selection(tmp_path):
    from ms3seg_app.bids import collect_inputs

    inputs, without = collect_inputs(EXAMPLE, ["01"], ["02"])
    assert [fi.prefix for fi in inputs] == ["sub-01_ses-02"] and without == []
    inputs, _ = collect_inputs(EXAMPLE, ["01"])
    assert [fi.prefix for fi in inputs] == ["sub-01_ses-01", "sub-01_ses-02"]
    assert inputs[0].t1w is not None and inputs[1].t1w is None  # T1w only from the same session
    inputs, _ = collect_inputs(EXAMPLE)
    assert [fi.prefix for fi in inputs] == ["sub-01_ses-01", "sub-01_ses-02", "sub-02"]
    from ms3seg_app.exceptions import InputDataError

    with pytest.raises(InputDataError, match="not found"):
        collect_inputs(EXAMPLE, ["07"])
    f = tmp_path / "filter.json"
    f.write_text('{"flair": {"session": "01"}}')
    from ms3seg_app.bids import load_filters

    inputs, _ = collect_inputs(EXAMPLE, None, None, load_filters(f))
    assert [fi.prefix for fi in inputs] == ["sub-01_ses-01"]


def test_nprocs_parallel_gives_identical_outputs(example_run, tmp_path):
    rc, out = example_run
    par = tmp_path / "par"
    assert main([str(EXAMPLE), str(par), "participant", "--skull-strip", "none", "--skip-bids-validation",
                 "--device", "cpu", "--nprocs", "2", "--no-reports"]) == 0
    for f in sorted(out.rglob("*_desc-trimask_dseg.nii.gz")):
        assert (par / f.relative_to(out)).read_bytes() == f.read_bytes()


def test_bundled_ensemble_regression_on_bids_example(example_run):
    """Segmentation content, not only shapes: volumes of the bundled model on bids_example match
    the committed reference (tests/data/reference_volumes.tsv, written by
    scripts/make_reference_volumes.py when the bundled model changes)."""
    import pandas as pd

    from ms3seg_app.model.card import load_card

    rc, out = example_run
    ref = pd.read_csv(ROOT / "tests" / "data" / "reference_volumes.tsv", sep="\t")
    assert ref["model_sha256"].nunique() == 1
    assert ref["model_sha256"].iloc[0] == load_card().sha256, "bundled model changed: regenerate the reference"
    for _, row in ref.iterrows():
        got = pd.read_csv(next(out.rglob(f"{row['prefix']}_space-orig_desc-trimask_volumes.tsv")), sep="\t").iloc[0]
        for col in ("ventricles_ml", "normal_wmh_ml", "abnormal_wmh_ml", "icv_ml"):
            assert got[col] == pytest.approx(row[col], rel=0.02, abs=0.02), (row["prefix"], col)
        assert abs(int(got["lesion_count"]) - int(row["lesion_count"])) <= 1, row["prefix"]
