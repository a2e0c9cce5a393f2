"""BIDS converter, BIDS training reader and the evaluate command."""
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import needs_shared
from ms3seg_app.evaluation.evaluate import main as evaluate_main
from ms3seg_app.exceptions import InputDataError
from ms3seg_app.training.bids_data import read_bids_labelled, write_bids
from ms3seg_app.training.readers import read_trimask_sample


@pytest.fixture(scope="module")
def bids_labelled(tmp_path_factory, shared_data):
    vols = read_trimask_sample(shared_data / "trimask_sample")
    root = tmp_path_factory.mktemp("bidsdata")
    deriv = write_bids(vols, root)
    return vols, root, deriv


@needs_shared
def test_convert_and_read_back_identical(bids_labelled):
    vols, root, deriv = bids_labelled
    back = {v.subject: v for v in read_bids_labelled(root, deriv)}
    for v in vols:
        b = back[v.subject]
        np.testing.assert_array_equal(b.labels, v.labels)
        np.testing.assert_allclose(b.flair.affine, v.flair.affine)
        np.testing.assert_array_equal(np.asanyarray(b.flair.dataobj), np.asanyarray(v.flair.dataobj))
        assert b.annotated == v.annotated
        # the manual dseg carries the FLAIR's affine (readable in any viewer)
        d = nib.load(str(next(deriv.rglob(f"sub-{v.subject}_*dseg.nii.gz"))))
        np.testing.assert_allclose(d.affine, v.flair.affine)


@needs_shared
def test_reader_refuses_dseg_off_grid(bids_labelled, tmp_path):
    vols, root, deriv = bids_labelled
    root2 = tmp_path / "b"
    shutil.copytree(root, root2)
    f = next((root2 / "derivatives" / "manual").rglob("*_dseg.nii.gz"))
    img = nib.load(str(f))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine), str(f))
    with pytest.raises(InputDataError, match="grid"):
        read_bids_labelled(root2, root2 / "derivatives" / "manual")


@needs_shared
def test_evaluate_command(bids_labelled, tmp_path, capsys):
    vols, root, deriv = bids_labelled
    # a "prediction" = the truth with one lesion voxel removed and ventricles eroded
    pred_dir = tmp_path / "pred"
    for f in deriv.rglob("*_desc-manual_dseg.nii.gz"):
        img = nib.load(str(f))
        lab = np.asanyarray(img.dataobj).copy()
        lab[lab == 1] = 0 if "104252" in f.name else 1
        out = pred_dir / f.relative_to(deriv).parent / f.name.replace("desc-manual", "desc-trimask")
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, img.affine), str(out))
    (pred_dir / "dataset_description.json").write_text('{"Name": "p", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}')
    tsv = tmp_path / "ev.tsv"
    assert evaluate_main([str(pred_dir), str(deriv), "--out", str(tsv)]) == 0
    df = pd.read_csv(tsv, sep="\t")
    assert set(df["flair"]) == {"subject-104252", "subject-105755"}
    ven = df[df["class_name"] == "ventricles"].set_index("flair")["dice"]
    assert ven["subject-104252"] == 0.0 and ven["subject-105755"] == 1.0
    assert (df[df["class_name"] == "abnormal WMH"]["lesion_f1"] == 1.0).all()
    assert "mean per class" in capsys.readouterr().out


@needs_shared
def test_train_and_finetune_from_bids(bids_labelled, tmp_path):
    from ms3seg_app.model.card import load_model
    from ms3seg_app.training.bids_data import train_from_bids
    from ms3seg_app.training.train import TrainConfig

    vols, root, deriv = bids_labelled
    cfg = TrainConfig(base_filters=4, epochs=1, batch_size=4, crop=64, warmup_epochs=0)
    w = train_from_bids(root, deriv, tmp_path / "m1", cfg)
    (model,), card = load_model(w)                       # card written, sha256 verified
    assert card.data["training"]["data"]["subjects"] == ["104252", "105755"]
    assert model.output_shape[-1] == 4
    cfg2 = TrainConfig(base_filters=16, epochs=1, batch_size=4, crop=64, warmup_epochs=0)
    w2 = train_from_bids(root, deriv, tmp_path / "m2", cfg2, init=w)   # fine-tune: the whole initial card
    (m2,), card2 = load_model(w2)
    assert card2.architecture["base_filters"] == 4 and card2.preprocessing == card.preprocessing
    assert card2.data["training"]["data"]["fine_tuned_from"] == str(w)
    assert m2.count_params() == model.count_params()
