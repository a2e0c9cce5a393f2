"""Input collection: one malformed FLAIR sidecar fails only its FLAIR; inheritance still works.

The datasets are made of empty placeholder images: pybids indexes names, never opens images.
"""
import json
from pathlib import Path

import pytest

from ms3seg_app.bids import collect_inputs

BAD_SIDECARS = {
    "invalid_json": (b'{"EchoTime": 0.1,, }', "not valid JSON (line 1 column 18"),
    "list": (b'[{"EchoTime": 0.1}]', "holds a JSON list, not an object"),
    "not_utf8": (b'{"Manufacturer": "Siemens \xe9"}', "not UTF-8 text"),
}


def _dataset(root: Path, subjects=("01", "03")) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for sub in subjects:
        anat = root / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{sub}_FLAIR.nii.gz").write_bytes(b"")
        (anat / f"sub-{sub}_FLAIR.json").write_text(json.dumps({"EchoTime": 0.1, "SliceThickness": 5.0}))
    return root


@pytest.mark.parametrize("kind", sorted(BAD_SIDECARS))
def test_bad_sidecar_fails_only_its_flair(tmp_path, kind):
    bids = _dataset(tmp_path / "bids")
    content, expected = BAD_SIDECARS[kind]
    (bids / "sub-03" / "anat" / "sub-03_FLAIR.json").write_bytes(content)
    inputs, without = collect_inputs(bids)
    assert [fi.prefix for fi in inputs] == ["sub-01", "sub-03"] and without == []
    good, bad = inputs
    assert good.error is None and good.metadata == {"EchoTime": 0.1, "SliceThickness": 5.0}
    assert bad.metadata == {}
    assert bad.error.startswith("sub-03/anat/sub-03_FLAIR.json: ")
    assert expected in bad.error
    assert "\n" not in bad.error
    assert "delete" in bad.error  # names the fix


def test_bom_sidecar_is_read_with_a_warning(tmp_path, caplog):
    bids = _dataset(tmp_path / "bids")
    (bids / "sub-03" / "anat" / "sub-03_FLAIR.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"EchoTime": 0.12, "Manufacturer": "GE"}).encode())
    caplog.set_level("WARNING", logger="ms3seg")
    inputs, _ = collect_inputs(bids)
    assert [fi.prefix for fi in inputs] == ["sub-01", "sub-03"]
    assert all(fi.error is None for fi in inputs)
    assert inputs[1].metadata == {"EchoTime": 0.12, "Manufacturer": "GE"}
    assert "sub-03/anat/sub-03_FLAIR.json" in caplog.text and "byte-order mark" in caplog.text


def test_participant_selection_skips_bad_sidecars_of_others(tmp_path):
    bids = _dataset(tmp_path / "bids")
    (bids / "sub-03" / "anat" / "sub-03_FLAIR.json").write_text("{")
    inputs, _ = collect_inputs(bids, ["01"])
    assert [(fi.prefix, fi.error) for fi in inputs] == [("sub-01", None)]


def test_inheritance_top_level_and_entity_subset(tmp_path):
    bids = _dataset(tmp_path / "bids")
    (bids / "FLAIR.json").write_text(json.dumps({"Manufacturer": "X", "EchoTime": 9.0}))
    # applies only to FLAIRs with acq-axial: not to sub-01_FLAIR.nii.gz
    (bids / "sub-01" / "anat" / "sub-01_acq-axial_FLAIR.json").write_text(json.dumps({"SliceThickness": 3.0}))
    (bids / "sub-03" / "anat" / "sub-03_FLAIR.json").unlink()  # inherits the top-level file only
    inputs, _ = collect_inputs(bids)
    md = {fi.prefix: fi.metadata for fi in inputs}
    assert md["sub-01"] == {"EchoTime": 0.1, "Manufacturer": "X", "SliceThickness": 5.0}  # nearer file wins
    assert md["sub-03"] == {"EchoTime": 9.0, "Manufacturer": "X"}


def test_bad_inherited_sidecar_fails_each_flair_that_uses_it(tmp_path):
    bids = _dataset(tmp_path / "bids")
    (bids / "FLAIR.json").write_text('{"Manufacturer": ')
    inputs, _ = collect_inputs(bids)
    assert len(inputs) == 2
    assert all(fi.error and fi.error.startswith("FLAIR.json: not valid JSON") for fi in inputs)


def test_bids_example_metadata_unchanged():
    example = Path(__file__).resolve().parent.parent / "bids_example"
    inputs, _ = collect_inputs(example, ["02"])
    assert inputs[0].error is None
    assert inputs[0].metadata == json.loads((example / "sub-02" / "anat" / "sub-02_FLAIR.json").read_text())
