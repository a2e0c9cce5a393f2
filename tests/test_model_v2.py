"""Issue 10 (model v2): skull-independent normalisation, aligned augmentation, uncertainty column."""
import nibabel as nib
import numpy as np
import pytest

from conftest import needs_shared


@needs_shared
def test_same_model_input_with_and_without_skull(shared_data):
    """The FLAIR and its FSL-BET skull-stripped copy reach the network with the same brain intensities."""
    from ms3seg_app.preprocessing import to_model_slices
    from ms3seg_app.training.train import PREPROCESSING

    reg = shared_data / "ms3seg_sample" / "MS_100_patient_registered"
    for sid in ("104670", "110218", "112776"):
        head = nib.load(reg / sid / f"{sid}_FLAIR.nii.gz")
        brain = nib.load(reg / sid / f"{sid}_FLAIR_brain.nii.gz")
        bmask = np.asanyarray(nib.load(reg / sid / f"{sid}_brain_mask.nii.gz").dataobj) > 0.5
        g1, x1 = to_model_slices(head, PREPROCESSING)
        g2, x2 = to_model_slices(nib.Nifti1Image(np.asarray(brain.dataobj, np.float32), head.affine), PREPROCESSING)
        # compare on the input grid, inside the brain (the slice centring may differ by the skull)
        v1, v2 = g1.inverse(x1), g2.inverse(x2)
        inner = bmask & (v1 > 0.05)
        rel = np.abs(v1[inner] - v2[inner]).mean() / v1[inner].mean()
        assert rel < 0.03, (sid, rel)


def test_augmentation_keeps_labels_on_their_structures():
    """Every spatial augmentation moves image, labels and brain mask together."""
    from ms3seg_app.training.dataset import augment

    yy, xx = np.mgrid[0:160, 0:160]
    labels = np.zeros((160, 160), np.uint8)
    labels[(yy - 60) ** 2 + (xx - 70) ** 2 < 15 ** 2] = 1            # dark blob
    labels[(yy - 100) ** 2 + (xx - 95) ** 2 < 8 ** 2] = 3            # bright blob
    image = np.full((160, 160), 1.0, np.float32)
    image[labels == 1] = 0.2
    image[labels == 3] = 2.5
    brain = (yy - 80) ** 2 + (xx - 80) ** 2 < 70 ** 2
    rng = np.random.default_rng(0)
    for _ in range(40):
        img, lab = augment(image, labels, rng, 128, 1.0, brain)
        if (lab == 3).sum() > 30 and (lab == 1).sum() > 30:
            core3 = lab == 3
            assert np.median(img[core3]) > 1.5 * np.median(img[lab == 0][img[lab == 0] > 0.3])
            assert np.median(img[lab == 1]) < 0.6 * np.median(img[lab == 3])


def test_lesion_uncertainty_column_is_zero_for_agreeing_members_and_grows_with_disagreement():
    from ms3seg_app.lesions import lesion_table

    dseg = np.zeros((30, 30, 10), np.uint8)
    dseg[5:9, 5:9, 4:6] = 3
    dseg[20:24, 20:24, 4:6] = 3
    unc = np.zeros(dseg.shape, np.float32)
    t0 = lesion_table(dseg, np.eye(4), uncertainty=unc)
    assert list(t0["uncertainty"]) == [0.0, 0.0]
    unc[20:24, 20:24, 4:6] = 0.25
    t1 = lesion_table(dseg, np.eye(4), uncertainty=unc)
    assert t1["uncertainty"].tolist() == pytest.approx([0.0, 0.5])
