"""Command line: path mistakes and bad filter files exit 2 before anything is written;
--version, --info and --help."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ms3seg_app import __version__
from ms3seg_app.cli.parser import _build_parser, info_report, parse_args

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "bids_example"


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args([str(a) for a in argv])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ms3seg: error: "), lines  # no usage block for these
    return lines[0]


@pytest.fixture
def bids(tmp_path):
    d = tmp_path / "bids"
    d.mkdir()
    (d / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    return d


def _nothing_written(tmp_path, before):
    assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case", ["work_below_file", "work_is_file", "output_below_file", "output_is_file",
                                  "work_in_bids"])
def test_output_and_work_dir_mistakes(case, tmp_path, bids, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    out, work = tmp_path / "out", tmp_path / "work"
    if case == "work_below_file":
        work, expected = afile / "work", ["-w/--work-dir", "is below", "which is a file"]
    elif case == "work_is_file":
        work, expected = afile, ["-w/--work-dir", "exists and is not a folder"]
    elif case == "output_below_file":
        out, expected = afile / "sub" / "out", ["output_dir", "is below", "which is a file"]
    elif case == "output_is_file":
        out, expected = afile, ["output_dir", "exists and is not a folder"]
    else:
        work, expected = bids / "work", ["-w/--work-dir", "inside bids_dir", "outside it"]
    before = sorted(tmp_path.rglob("*"))
    msg = _usage_error([bids, out, "participant", "-w", work], capsys)
    assert msg.startswith("ms3seg: error: ")
    for part in expected:
        assert part in msg
    assert not (tmp_path / "out").exists()
    _nothing_written(tmp_path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; os.access is always true")
def test_unwritable_output_parent(tmp_path, bids, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        msg = _usage_error([bids, ro / "out", "participant"], capsys)
    finally:
        ro.chmod(0o755)
    assert "output_dir" in msg and "not writable" in msg
    assert not (ro / "out").exists()


def test_unwritable_output_parent_simulated(tmp_path, bids, capsys, monkeypatch):
    """The same check where the tests run as root: os.access says no for one folder."""
    import ms3seg_app.cli.parser as parser_mod

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(parser_mod.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    msg = _usage_error([bids, ro / "out", "participant"], capsys)
    assert f"would be created in {ro}, which is not writable" in msg
    msg = _usage_error([bids, tmp_path / "out", "participant", "-w", ro], capsys)
    assert f"-w/--work-dir {ro} is not writable" in msg
    assert not (ro / "out").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "file", "no_description"])
def test_bids_dir_mistakes(case, tmp_path, capsys):
    if case == "missing":
        bids, expected = tmp_path / "nope", "does not exist"
    elif case == "file":
        bids = tmp_path / "f.txt"
        bids.write_text("x")
        expected = "is a file, not a folder"
    else:
        bids = tmp_path / "plain"
        bids.mkdir()
        expected = "has no dataset_description.json"
    before = sorted(tmp_path.rglob("*"))
    msg = _usage_error([bids, tmp_path / "out", "participant"], capsys)
    assert "bids_dir" in msg and expected in msg
    _nothing_written(tmp_path, before)


@pytest.mark.parametrize("flag", ["--model", "--bids-filter-file"])
def test_file_arguments_must_be_files(flag, tmp_path, bids, capsys):
    msg = _usage_error([bids, tmp_path / "out", "participant", flag, tmp_path / "nope.json"], capsys)
    assert flag in msg and "does not exist" in msg
    msg = _usage_error([bids, tmp_path / "out", "participant", flag, bids], capsys)
    assert flag in msg and "is not a file" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,expected", [
    ("{", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"bold": {"task": "rest"}}', "unknown query 'bold'"),
    ('{"flair": "axial"}', "'flair' must map to an object"),
    ('{"t1w": ["x"]}', "'t1w' must map to an object"),
])
def test_bad_filter_file_is_a_usage_error(content, expected, tmp_path, bids, capsys):
    f = tmp_path / "filters.json"
    f.write_text(content)
    msg = _usage_error([bids, tmp_path / "out", "participant", "--bids-filter-file", f], capsys)
    assert expected in msg and str(f) in msg
    assert not (tmp_path / "out").exists()


def test_good_filter_file_and_paths_are_accepted(tmp_path, bids):
    f = tmp_path / "filters.json"
    f.write_text('{"flair": {"session": "01"}, "t2w": {}}')
    o = parse_args([str(bids), str(tmp_path / "a" / "b" / "out"), "participant", "--bids-filter-file", str(f),
                    "-w", str(tmp_path / "w"), "--omp-nthreads", "3"])
    assert o.bids_filters == {"flair": {"session": "01"}, "t2w": {}}
    assert o.work_dir == (tmp_path / "w").resolve() and o.output_dir.is_absolute()
    assert o.omp_nthreads == 3 and o.bids_filter_file == f
    assert not (tmp_path / "a").exists() and not (tmp_path / "w").exists()  # nothing created


def test_dest_names_kept():
    dests = {a.dest for a in _build_parser()._actions}
    assert {"bids_dir", "output_dir", "analysis_level", "participant_label", "session_label",
            "bids_filter_file", "skip_bids_validation", "work_dir", "nprocs", "omp_nthreads", "skull_strip",
            "n4", "model", "allow_unverified_model", "device", "no_tta", "no_reports", "verbose",
            "quiet"} <= dests


def test_version_is_one_line_and_light():
    code = ("import sys, runpy; sys.argv = ['ms3seg', '--version']\n"
            "try:\n    runpy.run_module('ms3seg_app', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    heavy = sorted(m for m in ('tensorflow', 'keras', 'torch', 'nipype', 'bids', 'pandas',"
            " 'nibabel', 'ants') if m in sys.modules)\n"
            "    print('HEAVY', heavy, file=sys.stderr); raise SystemExit(e.code)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"ms3seg-app {__version__}"]
    assert "HEAVY []" in r.stderr
    assert elapsed < 15  # a TensorFlow import alone takes several seconds on these machines


def test_info_reports_everything_and_survives_a_broken_model(monkeypatch):
    import ms3seg_app.model.card as card

    def broken():
        raise RuntimeError("card missing")

    monkeypatch.setattr(card, "describe_installed_model", broken, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("FSLDIR", raising=False)
    lines = info_report().splitlines()
    assert lines[0] == f"ms3seg-app {__version__}"
    assert lines[1].startswith("Python: ") and lines[2].startswith("platform: ")
    assert lines[3] == "model: unavailable (RuntimeError: card missing)"
    assert lines[4].startswith("FSL: not found") and "FSLDIR" in lines[4]
    assert lines[5] == "GPU: not checked (CUDA_VISIBLE_DEVICES is empty)"


def test_info_in_a_subprocess_does_not_import_stages():
    code = ("import sys; from ms3seg_app.cli.parser import parse_args\n"
            "try:\n    parse_args(['--info'])\n"
            "except SystemExit as e:\n"
            "    print('STAGES', 'ms3seg_app.stages' in sys.modules, 'tensorflow' in sys.modules, file=sys.stderr)\n"
            "    raise SystemExit(e.code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "STAGES False False" in r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"ms3seg-app {__version__}"
    assert any(ln.startswith("model: ") for ln in out)
    assert out[-2].startswith("FSL: ") and out[-1].startswith("GPU: ")


def test_help_groups_examples_and_no_duplicate_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for group in ("inputs and selection:", "processing options:", "performance:", "model:",
                  "output and verbosity:"):
        assert group in text
    examples = text.split("examples:")[1]
    assert "participant --participant-label" in examples and " group\n" in examples and "README.md" in examples
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not issubclass(_build_parser().formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in _build_parser()._actions:  # one default per option, not a hand-written one plus argparse's
        assert (action.help or "").count("(default:") <= 1, action.option_strings


def test_filters_in_namespace_match_load_filters(tmp_path, bids):
    from ms3seg_app.bids import load_filters

    f = tmp_path / "f.json"
    f.write_text(json.dumps({"flair": {"acquisition": "ax"}}))
    o = parse_args([str(bids), str(tmp_path / "out"), "participant", "--bids-filter-file", str(f)])
    assert o.bids_filters == load_filters(o.bids_filter_file)
