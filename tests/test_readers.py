"""Readers on the real development data (skipped where ../shared/data is absent)."""
import shutil

import nibabel as nib
import numpy as np

from conftest import needs_shared
from ms3seg_app.training.readers import (ALL_ANNOTATED, NO_NWMH, NO_VENTRICLES, find_duplicate_images, contrast_ratio,
                                         mask_fit_score, read_ms3seg_sample, read_normal_wmh_png,
                                         read_trimask_sample)


@needs_shared
def test_ms3seg_sample_reader_drops_the_duplicated_scan(shared_data):
    vols = read_ms3seg_sample(shared_data / "ms3seg_sample")
    ids = [v.subject for v in vols]
    assert len(vols) == 9
    # the two ids share one image; exactly one survives, the one whose masks fit
    assert ("102313" in ids) != ("107130" in ids)
    for v in vols:
        assert v.labels.shape == v.flair.shape and v.labels.dtype == np.uint8
        assert set(np.unique(v.labels)) <= {0, 1, 3}
        assert v.annotated == NO_NWMH
        flair = np.asanyarray(v.flair.dataobj)
        assert mask_fit_score(flair, v.labels == 1) < 0.6      # ventricles dark vs their ring
        assert contrast_ratio(flair, v.labels == 3) > 1.2      # lesions bright vs their ring
        assert (v.labels == 1).sum() > 1000 and (v.labels == 3).sum() > 50


@needs_shared
def test_duplicate_detection_is_by_content_not_id(shared_data, tmp_path):
    src = shared_data / "ms3seg_sample" / "MS_100_patient_registered"
    a = src / "101228" / "101228_FLAIR.nii.gz"
    # same content, different header/compression and file name
    img = nib.load(str(a))
    copy = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine * 1.0)
    nib.save(copy, str(tmp_path / "x.nii"))
    shutil.copy(src / "101627" / "101627_FLAIR.nii.gz", tmp_path / "y.nii.gz")
    groups = find_duplicate_images({"p": a, "q": tmp_path / "x.nii", "r": tmp_path / "y.nii.gz"})
    assert groups == [["p", "q"]]
    groups = find_duplicate_images({k: src / k / f"{k}_FLAIR.nii.gz" for k in ("102313", "107130", "101228")})
    assert groups == [["102313", "107130"]]


@needs_shared
def test_trimask_and_png_readers(shared_data):
    tv = read_trimask_sample(shared_data / "trimask_sample")
    assert [v.subject for v in tv] == ["104252", "105755"]
    for v in tv:
        assert v.annotated == ALL_ANNOTATED
        counts = np.bincount(v.labels.ravel(), minlength=4)
        assert all(counts[1:] > 100)
        assert v.labels.max() == 3  # stray 255s thresholded, not kept
    sl = read_normal_wmh_png(shared_data / "normal_wmh_png")
    assert len(sl) == 20 and sl[0].annotated == NO_VENTRICLES
    assert set(np.unique(np.concatenate([s.labels.ravel() for s in sl]))) == {0, 2, 3}
    assert sl[0].image.shape == (256, 256)


@needs_shared
def test_mirrored_masks_are_realigned(shared_data):
    """Some development masks are stored left-right mirrored; the reader finds it by contrast."""
    vols = {v.subject: v for v in read_ms3seg_sample(shared_data / "ms3seg_sample")}
    v = vols["112776"]
    assert v.extra["alignment"]["lesions"] != "index"
    assert v.extra["alignment"]["ventricles"] != "index"
    assert vols["104670"].extra["alignment"] == {"ventricles": "index", "lesions": "index"}
