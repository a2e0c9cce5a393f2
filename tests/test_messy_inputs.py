"""Defects found by the messy-input review of 2026-12-03: FLAIRs and T1w/T2w that cannot be
read (DataLad/git-annex links whose content was not fetched, truncated or 4D files)."""
import gzip
import json
import os

import nibabel as nib
import numpy as np

from test_review_defects import _args, _dataset, _run

ANAT = ("sub-01", "ses-01", "anat")


def _outputs(out):
    anat = out.joinpath(*ANAT)
    return anat / "sub-01_ses-01_space-orig_desc-trimask_dseg.json", anat / "sub-01_ses-01_space-orig_desc-coreg_T1w.nii.gz"


def test_a_flair_whose_content_was_not_fetched_fails_alone(tmp_path, tiny_model):
    """A broken link (``datalad get`` not run for it) stopped the whole run with exit 70."""
    bids, out = _dataset(tmp_path, ("01", "02")), tmp_path / "out"
    flair = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    flair.unlink()
    flair.symlink_to("../../.git/annex/objects/XX/MISSING.nii.gz")
    assert _run([bids, out, *_args(tiny_model)]) == 1
    for ses in ("01", "02"):
        assert (out / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_space-orig_desc-trimask_dseg.json").is_file()
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert len(crash) == 1
    err = crash[0].read_text()
    assert "sub-02_FLAIR.nii.gz: cannot open the file (a link to content not present: `datalad get`" in err
    assert "internal error" not in err


def test_a_t1w_whose_content_was_not_fetched_leaves_the_flair_results_and_is_used_once_fetched(tmp_path, tiny_model):
    """The FLAIR's segmentation was lost ("internal error ... this is a bug") when its T1w was a
    broken link; now the T1w is left out with a QC warning, and used once it can be read."""
    bids, out = _dataset(tmp_path, ("01",)), tmp_path / "out"
    t1w = bids.joinpath(*ANAT) / "sub-01_ses-01_T1w.nii.gz"
    content = tmp_path / "annex" / "t1w.nii.gz"
    content.parent.mkdir()
    os.replace(t1w, content)
    t1w.symlink_to(tmp_path / "annex" / "not-fetched.nii.gz")
    args = _args(tiny_model, "--session-label", "01")
    assert _run([bids, out, *args]) == 0
    side, coreg = _outputs(out)
    meta = json.loads(side.read_text())
    assert "T1w" in meta["AnatomicalsNotUsed"] and not coreg.exists()
    assert any(w.startswith("the T1w was not used:") and "datalad get" in w for w in meta["QCWarnings"])
    assert meta["CoregisteredSHA256"] == {"T1w": "unreadable"}
    before = side.read_bytes()
    assert _run([bids, out, *args]) == 0
    assert side.read_bytes() == before  # complete as it is: not redone while the T1w stays unfetched
    t1w.unlink()
    t1w.symlink_to(content)  # `datalad get`
    assert _run([bids, out, *args]) == 0
    meta = json.loads(side.read_text())
    assert meta["AnatomicalsNotUsed"] == {} and coreg.is_file() and str(coreg.relative_to(out)) in meta["Outputs"]


def test_a_truncated_or_4d_t1w_is_left_out_with_the_reason(tmp_path, tiny_model):
    """A truncated T1w was co-registered as mostly zeros (ITK fills what is missing) without a
    warning; a 4D T1w failed the FLAIR as an internal error."""
    bids, out = _dataset(tmp_path, ("01",)), tmp_path / "out"
    t1w = bids.joinpath(*ANAT) / "sub-01_ses-01_T1w.nii.gz"
    whole = t1w.read_bytes()
    t1w.write_bytes(gzip.compress(gzip.decompress(whole)[:50000]))
    args = _args(tiny_model, "--session-label", "01")
    assert _run([bids, out, *args]) == 0
    side, coreg = _outputs(out)
    meta = json.loads(side.read_text())
    assert "cannot read the image" in meta["AnatomicalsNotUsed"]["T1w"] and not coreg.exists()

    t1w.write_bytes(whole)
    img = nib.load(str(t1w))
    data = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), str(t1w))
    assert _run([bids, out, *args]) == 0
    meta = json.loads(side.read_text())
    assert "expected a 3D T1w volume" in meta["AnatomicalsNotUsed"]["T1w"] and not coreg.exists()


def test_only_acquisition_parameters_of_the_sidecar_reach_the_outputs_and_nan_is_written_as_null(tmp_path,
                                                                                                   tiny_model):
    """Free text (``ImageComments`` with a name and birth date), UIDs, institution and times were
    copied into the dseg sidecar and the report; a ``NaN`` in the input sidecar made the output
    sidecar invalid JSON (``JSON_INVALID`` for the BIDS validator)."""
    bids, out = _dataset(tmp_path, ("02",)), tmp_path / "out"
    sidecar = bids / "sub-02" / "anat" / "sub-02_FLAIR.json"
    meta = json.loads(sidecar.read_text())
    private = {"ImageComments": "John Doe 1970-01-01", "StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.5",
               "InstitutionName": "Clinic of Somewhere", "AcquisitionTime": "10:11:12", "PatientSize": 1.8,
               "StationName": "MR-ROOM-2"}
    sidecar.write_text(json.dumps({**meta, **private, "MagneticFieldStrength": 3, "EchoTime": 0.1})[:-1]
                       + ', "SAR": NaN}')
    assert _run([bids, out, *[a for a in _args(tiny_model) if a != "--no-reports"]]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    written = json.loads(side.read_text(), parse_constant=refuse)  # valid JSON: no NaN
    acq = written["AcquisitionMetadata"]
    assert acq["MagneticFieldStrength"] == 3 and acq["EchoTime"] == 0.1 and acq["SAR"] is None
    assert not set(private) & set(acq)
    html = next(out.glob("sub-02*.html")).read_text()
    for value in ("John Doe", "1.2.3.4", "Clinic of Somewhere", "MR-ROOM-2"):
        assert value not in html and value not in side.read_text()


def test_the_next_command_is_quoted_for_the_shell(tmp_path, tiny_model, caplog):
    import logging
    import shlex

    bids = _dataset(tmp_path / "my data é", ("02",))
    out = tmp_path / "out dir"
    with caplog.at_level(logging.INFO, logger="ms3seg"):
        assert _run([bids, out, *_args(tiny_model)]) == 0
    line = next(r.getMessage() for r in caplog.records if "next: ms3seg" in r.getMessage())
    assert shlex.split(line.split("next: ", 1)[1]) == ["ms3seg", str(bids), str(out), "group"]


def test_no_reports_redoes_nothing_and_a_redone_flair_loses_its_old_report(tmp_path, tiny_model):
    """``--no-reports`` was part of the run key: toggling it recomputed every FLAIR, and a FLAIR
    redone without reports kept the earlier report, which showed the earlier results."""
    bids, out = _dataset(tmp_path, ("02",)), tmp_path / "out"
    with_reports = [a for a in _args(tiny_model) if a != "--no-reports"]
    assert _run([bids, out, *with_reports]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    report = out / "sub-02.html"
    assert report.is_file()
    before = side.read_bytes()
    assert _run([bids, out, *_args(tiny_model)]) == 0
    assert side.read_bytes() == before and report.is_file()  # not redone
    flair = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    img = nib.load(str(flair))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) * 1.01, img.affine, img.header), str(flair))
    assert _run([bids, out, *_args(tiny_model)]) == 0
    assert side.read_bytes() != before and not report.exists()  # redone: the old report went
    assert _run([bids, out, *with_reports]) == 0
    assert report.is_file()


def test_results_made_with_no_reports_before_it_left_the_run_key_stay_complete(tmp_path, tiny_model):
    import dataclasses

    from ms3seg_app.model.card import load_card
    from ms3seg_app.participant import RunOptions, _run_key, run_key

    bids, out = _dataset(tmp_path, ("02",)), tmp_path / "out"
    assert _run([bids, out, *_args(tiny_model)]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    meta = json.loads(side.read_text())
    card = load_card(tiny_model)
    options = RunOptions(skull_strip="none")
    assert meta["RunKey"] == run_key(card, options) == run_key(card, dataclasses.replace(options, reports=False))
    meta["RunKey"] = _run_key(card, options, reports=False)  # as such runs wrote it before
    assert meta["RunKey"] != run_key(card, options)
    side.write_text(json.dumps(meta))
    before = side.read_bytes()
    assert _run([bids, out, *_args(tiny_model)]) == 0
    assert side.read_bytes() == before


def test_deepbet_finds_the_brain_of_a_flair_zero_padded_onto_a_large_grid():
    """deepbet resamples the whole grid to 128^3: padded to 768x768, the head was a few voxels
    wide there and the mask took 1.5 M voxels of padding (ICV 14,493 instead of 1,852 mL)."""
    from conftest import ROOT
    from ms3seg_app.stages import brain_mask

    img = nib.load(str(ROOT / "bids_example" / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"))
    data = np.asarray(img.dataobj, np.float32)
    ref, method, _ = brain_mask(nib.Nifti1Image(data, img.affine), "deepbet")
    pad = 256
    big = np.zeros((data.shape[0] + 2 * pad, data.shape[1] + 2 * pad, data.shape[2]), np.float32)
    big[pad:-pad, pad:-pad] = data
    shift = np.eye(4)
    shift[:2, 3] = -pad
    mask, _, _ = brain_mask(nib.Nifti1Image(big, img.affine @ shift), "deepbet")
    assert not mask[:pad].any() and not mask[-pad:].any() and not mask[:, :pad].any() and not mask[:, -pad:].any()
    inner = mask[pad:-pad, pad:-pad]
    assert 2 * np.count_nonzero(inner & ref) / (np.count_nonzero(inner) + np.count_nonzero(ref)) > 0.97
