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
