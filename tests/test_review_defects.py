"""Defects found by the review of 2026-12-03: stale completion markers, outputs of FLAIRs that
differ only in task/echo/part/chunk, voxel sizes from the affine, session order."""
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT

EXAMPLE = ROOT / "bids_example"


def _run(argv):
    from ms3seg_app.cli.run import main

    return main([str(a) for a in argv])


def _args(model, *extra):
    return ["participant", "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu", "--no-reports",
            "--model", model, *extra]


def _dataset(tmp_path, subjects=("02",)):
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    for sub in bids.glob("sub-*"):
        if sub.name.removeprefix("sub-") not in subjects:
            shutil.rmtree(sub)
    pt = bids / "participants.tsv"
    if pt.is_file():
        df = pd.read_csv(pt, sep="\t", dtype=str)
        df[df["participant_id"].isin([f"sub-{s}" for s in subjects])].to_csv(pt, sep="\t", index=False)
    return bids


def test_a_failed_rerun_leaves_the_flair_incomplete_and_the_group_reports_it(tmp_path, tiny_model):
    """A FLAIR re-converted into a broken file: the rerun fails, the previous run's completion
    marker is gone, and the group level lists the failure and flags the old tables as incomplete
    (before: the old results were reported as current, the crash log hidden)."""
    bids, out = _dataset(tmp_path), tmp_path / "out"
    assert _run([bids, out, *_args(tiny_model)]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    assert side.is_file()
    flair = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    img = nib.load(flair)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), flair)
    assert _run([bids, out, *_args(tiny_model)]) == 1
    assert not side.exists(), "the previous run's completion marker survived a failed rerun"
    assert _run([bids, out, "group"]) == 0
    vol = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    row = vol[vol["participant_id"] == "sub-02"].iloc[0]
    assert "incomplete" in row["qc_flags"]
    qc = pd.read_csv(out / "group_desc-trimask_qc.tsv", sep="\t", keep_default_na=False)
    assert any("NaN" in p for p in qc["problem"]), qc.to_string()


def test_a_rerun_stopped_while_writing_leaves_no_completion_marker(tmp_path, tiny_model, monkeypatch):
    """A rerun with other options stopped between its first tables and its sidecar (walltime,
    quota): the FLAIR is incomplete, not the new tables under the old run's sidecar."""
    from ms3seg_app import participant

    bids, out = _dataset(tmp_path), tmp_path / "out"
    assert _run([bids, out, *_args(tiny_model)]) == 0
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    write = participant.atomic_write_text

    def stop_at_volumes(path, text):
        if path.name.endswith("_volumes.tsv"):
            raise KeyboardInterrupt  # as a job killed while writing
        return write(path, text)

    monkeypatch.setattr(participant, "atomic_write_text", stop_at_volumes)
    with pytest.raises(KeyboardInterrupt):
        _run([bids, out, *_args(tiny_model, "--no-tta")])
    assert not side.exists()
    monkeypatch.setattr(participant, "atomic_write_text", write)
    assert _run([bids, out, "group"]) == 0
    vol = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    assert "incomplete" in vol.loc[vol["participant_id"] == "sub-02", "qc_flags"].iloc[0]


def _copies(bids, names):
    """sub-02's FLAIR copied to ``names`` (the second one flipped left-right), the original removed."""
    anat = bids / "sub-02" / "anat"
    src = anat / "sub-02_FLAIR.nii.gz"
    img = nib.load(src)
    for i, name in enumerate(names):
        data = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(data[::-1] if i else data, img.affine), anat / name)
    for f in anat.glob("sub-02_FLAIR.*"):
        f.unlink()


def test_flairs_that_differ_only_in_chunk_get_outputs_of_their_own(tmp_path, tiny_model):
    """``chunk`` (and task, echo, part) name the outputs, in BIDS order (chunk after space):
    before, the two FLAIRs wrote one set of outputs, the second overwriting the first."""
    from ms3seg_app.derivatives import find_outputs

    bids, out = _dataset(tmp_path), tmp_path / "out"
    _copies(bids, ["sub-02_chunk-1_FLAIR.nii.gz", "sub-02_chunk-2_FLAIR.nii.gz"])
    assert _run([bids, out, *_args(tiny_model)]) == 0
    anat = out / "sub-02" / "anat"
    sides = sorted(anat.glob("*_desc-trimask_dseg.json"))
    assert [s.name for s in sides] == ["sub-02_space-orig_chunk-1_desc-trimask_dseg.json",
                                       "sub-02_space-orig_chunk-2_desc-trimask_dseg.json"]
    assert [json.loads(s.read_text())["Sources"][0].rsplit("/", 1)[-1] for s in sides] == [
        "sub-02_chunk-1_FLAIR.nii.gz", "sub-02_chunk-2_FLAIR.nii.gz"]
    assert len(find_outputs(out, "volumes")) == 2
    assert _run([bids, out, *_args(tiny_model)]) == 0  # both complete: nothing redone
    assert [s.stat().st_mtime_ns for s in sides] == [s.stat().st_mtime_ns for s in sorted(anat.glob("*_dseg.json"))]
    assert _run([bids, out, "group"]) == 0
    vol = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    assert sorted(vol["flair"]) == ["sub-02_chunk-1_FLAIR.nii.gz", "sub-02_chunk-2_FLAIR.nii.gz"]


def test_flairs_that_would_share_outputs_both_fail_with_the_reason(tmp_path):
    """Entities a FLAIR may not carry in BIDS (here ``inv``, with validation skipped) do not name
    outputs: two FLAIRs differing only there are both refused, not one silently overwritten."""
    from ms3seg_app.bids import collect_inputs

    bids = _dataset(tmp_path)
    _copies(bids, ["sub-02_inv-1_FLAIR.nii.gz", "sub-02_inv-2_FLAIR.nii.gz"])
    inputs, _ = collect_inputs(bids, ["02"])
    assert len(inputs) == 2
    for fi in inputs:
        assert fi.error and "would write the same outputs (sub-02)" in fi.error
        assert "sub-02_inv-1_FLAIR.nii.gz" in fi.error and "--bids-filter-file" in fi.error


def test_voxel_sizes_come_from_the_affine_when_pixdim_disagrees(tmp_path, tiny_model):
    """A sform-only FLAIR whose pixdim says 1 mm (not read by nibabel, which places voxels by
    the sform): same tri-mask, volumes and table geometry as the consistent file, a warning
    that names the disagreement, and outputs whose pixdim is the affine's (before: the
    distance rule, the in-plane dilation, the table's slice thickness and the coverage warning
    used pixdim)."""
    bids, out = _dataset(tmp_path), tmp_path / "out"
    src = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    img = nib.load(src)
    odd = nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header.copy())
    odd.set_sform(img.affine, 1)
    odd.set_qform(None, 0)
    odd.header.set_zooms((1.0, 1.0, 1.0))
    dst = bids / "sub-03" / "anat" / "sub-03_FLAIR.nii.gz"
    dst.parent.mkdir(parents=True)
    nib.save(odd, dst)
    assert np.allclose(nib.load(dst).affine, img.affine) and nib.load(dst).header.get_zooms() == (1.0, 1.0, 1.0)
    (bids / "participants.tsv").unlink(missing_ok=True)
    assert _run([bids, out, *_args(tiny_model)]) == 0
    res = {}
    for sub in ("02", "03"):
        stem = out / f"sub-{sub}" / "anat" / f"sub-{sub}_space-orig_desc-trimask"
        dseg = nib.load(f"{stem}_dseg.nii.gz")
        vol = pd.read_csv(f"{stem}_volumes.tsv", sep="\t")
        side = json.loads(open(f"{stem}_dseg.json").read())
        res[sub] = (np.asarray(dseg.dataobj), dseg.header.get_zooms(), vol, side["QCWarnings"])
    np.testing.assert_array_equal(res["02"][0], res["03"][0])
    np.testing.assert_allclose(res["03"][1], (1.2, 1.2, 6.5), rtol=1e-6)
    cols = ["slice_thickness_mm", "inplane_mm", "icv_ml", "abnormal_wmh_ml", "normal_wmh_ml"]
    pd.testing.assert_frame_equal(res["02"][2][cols], res["03"][2][cols])
    assert res["03"][2]["slice_thickness_mm"].iloc[0] == pytest.approx(6.5)
    extra = [w for w in res["03"][3] if w not in res["02"][3]]
    assert len(extra) == 1 and "pixdim" in extra[0] and "affine" in extra[0], res["03"][3]


def test_sessions_are_compared_and_ordered_by_their_numbers(tmp_path):
    """ses-1 -> ses-2 -> ses-10 (text order gave ses-1 -> ses-10 -> ses-2, +9 then -8 mL); the
    baseline and the group table use the same order."""
    from ms3seg_app.group import baseline
    from ms3seg_app.longitudinal import longitudinal_changes

    rows = [dict(participant_id="sub-01", session_id=s, acq="n/a", run="n/a", prefix=f"sub-01_{s}",
                 flair_source="", abnormal_wmh_ml=v, normal_wmh_ml=0.0, ventricles_ml=0.0)
            for s, v in (("ses-10", 10.0), ("ses-2", 2.0), ("ses-1", 1.0), ("ses-m12", 12.0), ("ses-m6", 6.0))]
    out = longitudinal_changes(pd.DataFrame(rows), tmp_path, tmp_path)
    assert list(zip(out["session_from"], out["session_to"])) == [
        ("ses-1", "ses-2"), ("ses-2", "ses-10"), ("ses-10", "ses-m6"), ("ses-m6", "ses-m12")]
    assert list(out["delta_abnormal_wmh_ml"]) == [1.0, 8.0, -4.0, 6.0]
    assert baseline(pd.DataFrame(rows))["session_id"].tolist() == ["ses-1"]


def test_run_label_is_written_as_named_and_session_selection_is_named_in_the_message(tmp_path, tiny_model):
    """``run-01`` is ``01`` in the tables (it was written as 1); a participant whose FLAIRs the
    session label leaves out is reported as such, not as having no FLAIR."""
    bids, out = _dataset(tmp_path, ("01", "02")), tmp_path / "out"
    _copies(bids, ["sub-02_run-01_FLAIR.nii.gz"])
    assert _run([bids, out, *_args(tiny_model, "--participant-label", "02")]) == 0
    vol = out / "sub-02" / "anat" / "sub-02_run-01_space-orig_desc-trimask_volumes.tsv"
    assert pd.read_csv(vol, sep="\t", dtype=str)["run"].tolist() == ["01"]
    assert _run([bids, out, "group"]) == 0
    group = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", dtype=str)
    assert group["run"].tolist() == ["01"]

    out2 = tmp_path / "out2"
    assert _run([bids, out2, *_args(tiny_model, "--participant-label", "01", "02", "--session-label", "01")]) == 1
    log = "".join(p.read_text() for p in (out2 / "logs").glob("ms3seg_participant_*.log"))
    line = next(ln for ln in log.splitlines() if "sub-02:" in ln and "participant skipped" in ln)
    assert "no FLAIR matches the session label 01" in line and "no FLAIR found" not in line


def test_results_do_not_depend_on_the_storage_order(tmp_path, tiny_model):
    """The same FLAIR stored with its slice axis first (affine adjusted: the same voxels in the
    world): brain mask, tri-mask and probabilities are those of the axial file, voxel for voxel
    (before: hole filling, the in-plane dilation and the head mask for normalisation worked on
    stored axis 2 whatever it was, so they changed)."""
    bids, out = _dataset(tmp_path), tmp_path / "out"
    src = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    perm = (2, 0, 1)  # stored axis a of the new file is axis perm[a] of the axial one
    swap = np.eye(4)
    swap[:3, :3] = np.eye(3)[:, perm]
    dst = bids / "sub-03" / "anat" / "sub-03_FLAIR.nii.gz"
    dst.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.transpose(data, perm), img.affine @ swap), dst)
    (bids / "participants.tsv").unlink(missing_ok=True)
    assert _run([bids, out, *_args(tiny_model)]) == 0
    back = tuple(np.argsort(perm))
    for suffix in ("desc-brain_mask.nii.gz", "desc-trimask_dseg.nii.gz", "label-AWMH_probseg.nii.gz",
                   "label-NWMH_probseg.nii.gz", "label-VEN_probseg.nii.gz"):
        a = nib.load(out / "sub-02" / "anat" / f"sub-02_space-orig_{suffix}")
        b = nib.load(out / "sub-03" / "anat" / f"sub-03_space-orig_{suffix}")
        np.testing.assert_allclose(b.affine, a.affine @ swap, atol=1e-6)
        np.testing.assert_array_equal(np.transpose(np.asanyarray(b.dataobj), back), np.asanyarray(a.dataobj),
                                      err_msg=suffix)
    tables = [pd.read_csv(out / f"sub-{s}" / "anat" / f"sub-{s}_space-orig_desc-trimask_volumes.tsv", sep="\t")
              .drop(columns=["participant_id", "flair"]) for s in ("02", "03")]
    pd.testing.assert_frame_equal(*tables)  # the axial slice thickness and in-plane size included
    assert tables[0]["slice_thickness_mm"].iloc[0] == pytest.approx(6.5)


def test_a_changed_or_removed_t1w_makes_the_results_incomplete(tmp_path, tiny_model):
    """The T1w co-registered with a FLAIR is part of its results: re-converted, it is redone
    (before: the old co-registered T1w was kept); removed, its co-registered image goes and
    the FLAIR is redone without it."""
    bids, out = _dataset(tmp_path, ("01",)), tmp_path / "out"
    args = _args(tiny_model, "--session-label", "01")
    assert _run([bids, out, *args]) == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    side = anat / "sub-01_ses-01_space-orig_desc-trimask_dseg.json"
    t1_out = next(anat.glob("*_T1w.nii.gz"))
    meta = json.loads(side.read_text())
    assert set(meta["CoregisteredSHA256"]) == {"T1w"} and str(t1_out.relative_to(out)) in meta["Outputs"]
    assert _run([bids, out, *args]) == 0
    assert json.loads(side.read_text()) == meta  # unchanged inputs: nothing redone

    t1 = bids / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz"
    img = nib.load(t1)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine), t1)  # re-converted
    before = np.asanyarray(nib.load(t1_out).dataobj).copy()
    assert _run([bids, out, *args]) == 0
    assert json.loads(side.read_text())["CoregisteredSHA256"] != meta["CoregisteredSHA256"]
    assert not np.array_equal(np.asanyarray(nib.load(t1_out).dataobj), before)

    for f in t1.parent.glob("sub-01_ses-01_T1w.*"):
        f.unlink()
    assert _run([bids, out, *args]) == 0
    meta = json.loads(side.read_text())
    assert meta["CoregisteredSHA256"] == {} and not list(anat.glob("*_T1w.*"))
    assert not [o for o in meta["Outputs"] if "T1w" in o]


def test_crash_logs_of_a_flair_that_later_succeeds_are_resolved_and_older_folders_compared_by_time(tmp_path,
                                                                                                  tiny_model):
    """A FLAIR that failed and then succeeded: its crash log moves to ``logs/resolved/`` and the
    group lists no failure. In folders of earlier versions (crash logs left in ``logs/``), a
    crash log older than the complete results is not listed, a newer one is."""
    import os

    from ms3seg_app.group import collect_volumes, missing_and_failed

    bids, out = _dataset(tmp_path), tmp_path / "out"
    flair = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    good = flair.read_bytes()
    flair.write_bytes(good[:3000])  # truncated
    assert _run([bids, out, *_args(tiny_model)]) == 1
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert len(crash) == 1
    flair.write_bytes(good)
    assert _run([bids, out, *_args(tiny_model)]) == 0
    assert not list((out / "logs").glob("crash-*.txt"))
    assert (out / "logs" / "resolved" / crash[0].name).is_file()
    df = collect_volumes(out)
    assert missing_and_failed(out, bids, df).empty

    # an older version's folder: the crash log left in logs/
    legacy = out / "logs" / crash[0].name
    os.replace(out / "logs" / "resolved" / crash[0].name, legacy)
    side = out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json"
    t = side.stat().st_mtime
    os.utime(legacy, (t - 60, t - 60))
    assert missing_and_failed(out, bids, df).empty
    os.utime(legacy, (t + 60, t + 60))
    assert missing_and_failed(out, bids, df)["flair"].tolist() == ["sub-02"]


def test_axial_hole_filling_follows_the_inferior_superior_axis_of_any_storage():
    """A tube along inferior-superior: its lumen is a hole in every axial slice and open in the
    other planes. Stored with its axial axis first or last, the filled masks are the same
    voxels (the head mask's too)."""
    from ms3seg_app.preprocessing.geometry import fill_holes_per_slice, head_mask, inferior_superior_axis

    ii, jj = np.meshgrid(np.arange(21), np.arange(21), indexing="ij")
    r = np.hypot(ii - 10, jj - 10)
    ring = (r >= 4) & (r <= 7)
    tube = np.repeat(ring[:, :, None], 15, axis=2)  # (x, y, z): axial slices across axis 2
    want = np.repeat((r <= 7)[:, :, None], 15, axis=2)
    perm = (2, 0, 1)
    swap = np.eye(4)
    swap[:3, :3] = np.eye(3)[:, perm]
    first = np.transpose(tube, perm)  # stored (z, x, y)
    assert inferior_superior_axis(np.eye(4)) == 2 and inferior_superior_axis(swap) == 0
    np.testing.assert_array_equal(fill_holes_per_slice(tube.copy(), inferior_superior_axis(np.eye(4))), want)
    got = fill_holes_per_slice(first.copy(), inferior_superior_axis(swap))
    np.testing.assert_array_equal(np.transpose(got, np.argsort(perm)), want)
    img = np.where(tube, 100.0, 0.0).astype(np.float32)
    np.testing.assert_array_equal(
        np.transpose(head_mask(np.transpose(img, perm), axis=0), np.argsort(perm)), head_mask(img, axis=2))
    assert head_mask(img, axis=2)[10, 10, 7]


def test_outputs_keep_the_input_qform_when_pixdim_disagrees_with_the_sform(tmp_path):
    """pixdim belongs to the qform: an input whose qform (1 mm) and sform (1.2 x 1.2 x 6.5 mm)
    disagree keeps its qform in the outputs, exactly; without a qform, pixdim is the sform's."""
    from ms3seg_app.derivatives import image_like

    data = np.zeros((8, 8, 4), np.float32)
    ref = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    ref.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), 1)
    ref.set_sform(np.diag([1.2, 1.2, 6.5, 1.0]), 2)
    out = image_like(data, ref, np.uint8)
    np.testing.assert_allclose(out.get_qform(), ref.get_qform())
    np.testing.assert_allclose(out.get_sform(), ref.get_sform())
    np.testing.assert_allclose(out.header.get_zooms(), (1.0, 1.0, 1.0))
    ref.set_qform(None, 0)
    ref.header.set_zooms((1.0, 1.0, 1.0))
    np.testing.assert_allclose(image_like(data, ref, np.uint8).header.get_zooms(), (1.2, 1.2, 6.5))


def test_results_of_the_previous_version_are_redone_only_where_these_fixes_change_them(tmp_path, tiny_model):
    """A sidecar without ``CoregisteredSHA256`` (written before it existed) stays complete, its
    T1w taken as unchanged; a FLAIR stored non-axially or with a disagreeing pixdim is redone."""
    from ms3seg_app.participant import _changed_since_0_3_0_fixes

    bids, out = _dataset(tmp_path, ("01",)), tmp_path / "out"
    args = _args(tiny_model, "--session-label", "01")
    assert _run([bids, out, *args]) == 0
    side = out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_space-orig_desc-trimask_dseg.json"
    meta = json.loads(side.read_text())
    del meta["CoregisteredSHA256"]
    side.write_text(json.dumps(meta))
    before = side.read_bytes()
    assert _run([bids, out, *args]) == 0
    assert side.read_bytes() == before  # not redone

    flair = bids / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_FLAIR.nii.gz"
    assert not _changed_since_0_3_0_fixes(flair)
    img = nib.load(flair)
    swap = np.eye(4)
    swap[:3, :3] = np.eye(3)[:, (2, 0, 1)]
    nib.save(nib.Nifti1Image(np.transpose(np.asanyarray(img.dataobj), (2, 0, 1)), img.affine @ swap),
             tmp_path / "first.nii.gz")
    assert _changed_since_0_3_0_fixes(tmp_path / "first.nii.gz")
    odd = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    odd.set_qform(None, 0)
    odd.header.set_zooms((1.0, 1.0, 1.0))
    nib.save(odd, tmp_path / "pixdim.nii.gz")
    assert _changed_since_0_3_0_fixes(tmp_path / "pixdim.nii.gz")
