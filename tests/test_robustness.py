"""Bad input: each broken FLAIR fails alone, with a message naming the file, and no output."""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ms3seg_app.cli.run import main

ROOT = Path(__file__).resolve().parent.parent
GOOD = ROOT / "bids_example" / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"


def _dataset(tmp_path: Path, make_bad) -> tuple[Path, Path]:
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "sub-02" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    shutil.copy(GOOD, bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz")
    bad = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    make_bad(bad)
    return bids, bad


def _img(data, aff=None, **kw):
    return nib.Nifti1Image(data, np.diag([0.9, 0.9, 6.5, 1.0]) if aff is None else aff, **kw)


def _truncated(p):
    p.write_bytes(GOOD.read_bytes()[:3000])


def _not_nifti(p):
    p.write_bytes(b"this is not an image")


def _four_d(p):
    nib.save(_img(np.ones((32, 32, 10, 3), np.int16)), str(p))


def _two_d(p):
    nib.save(_img(np.ones((64, 64), np.int16), np.eye(4)), str(p))


def _all_zero(p):
    nib.save(_img(np.zeros((64, 64, 10), np.int16)), str(p))


def _constant(p):
    nib.save(_img(np.full((64, 64, 10), 300, np.int16)), str(p))


def _nan(p):
    a = np.asarray(nib.load(str(GOOD)).dataobj, np.float32)
    a[50:60, 50:60, 5] = np.nan
    nib.save(_img(a), str(p))


def _absurd_voxels(p):
    a = np.asarray(nib.load(str(GOOD)).dataobj)
    nib.save(_img(a, np.diag([90.0, 90.0, 650.0, 1.0])), str(p))


def _no_orientation(p):
    a = np.asarray(nib.load(str(GOOD)).dataobj)
    img = _img(a)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(p))


CASES = {
    "truncated": (_truncated, "cannot read"),
    "not-nifti": (_not_nifti, "cannot read"),
    "4d": (_four_d, "3D FLAIR"),
    "2d": (_two_d, "3D FLAIR"),
    "all-zero": (_all_zero, "constant"),
    "constant": (_constant, "constant"),
    "nan": (_nan, "NaN"),
    "absurd-voxel-size": (_absurd_voxels, "voxel size"),
    "no-qform-sform": (_no_orientation, "orientation"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flair_fails_alone(case, tmp_path, tiny_model, caplog):
    make_bad, message = CASES[case]
    bids, bad = _dataset(tmp_path, make_bad)
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--skip-bids-validation", "--skull-strip", "none",
               "--no-reports", "--model", str(tiny_model), "--device", "cpu"])
    assert rc == 1
    assert (out / "sub-01" / "anat" / "sub-01_space-orig_desc-trimask_dseg.nii.gz").exists()
    assert not (out / "sub-02").exists() or not any((out / "sub-02").rglob("*.nii.gz"))
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert len(crash) == 1
    text = crash[0].read_text()
    assert message in text and "sub-02_FLAIR.nii.gz" in text
    log = next((out / "logs").glob("ms3seg_participant_*.log")).read_text()
    assert "1 succeeded, 1 failed" in log


def test_overflow_prone_dtype_processed(tmp_path, tiny_model):
    """uint16 near its maximum and scaled int16 are processed in float, without overflow."""
    def make(p):
        a = np.asarray(nib.load(str(GOOD)).dataobj).astype(np.float64)
        a = (a / a.max() * 65000).astype(np.uint16)
        nib.save(_img(a), str(p))
    bids, bad = _dataset(tmp_path, make)
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--skip-bids-validation", "--skull-strip", "none",
                 "--no-reports", "--model", str(tiny_model)]) == 0
    d = nib.load(str(out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.nii.gz"))
    assert d.shape == nib.load(str(bad)).shape


def test_subject_without_flair_is_reported(tmp_path, tiny_model):
    bids, bad = _dataset(tmp_path, lambda p: shutil.copy(GOOD, p))
    (bids / "sub-03" / "anat").mkdir(parents=True)
    nib.save(_img(np.ones((8, 8, 8), np.int16)), str(bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz"))
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--skip-bids-validation", "--skull-strip", "none",
               "--no-reports", "--model", str(tiny_model), "--participant-label", "01", "03"])
    assert rc == 1
    log = next((out / "logs").glob("ms3seg_participant_*.log")).read_text()
    assert "sub-03" in log and "no FLAIR" in log
    assert (out / "sub-01" / "anat" / "sub-01_space-orig_desc-trimask_dseg.nii.gz").exists()


def test_input_dataset_never_written(tmp_path, tiny_model):
    bids, _ = _dataset(tmp_path, lambda p: shutil.copy(GOOD, p))
    before = {p: p.stat().st_mtime_ns for p in bids.rglob("*")}
    main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--skull-strip", "none",
          "--no-reports", "--model", str(tiny_model)])
    assert before == {p: p.stat().st_mtime_ns for p in bids.rglob("*")}
