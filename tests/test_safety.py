"""Reports escape dataset text, identifying fields never reach outputs, runs are offline,
and the segmentation does not depend on the storage order of the FLAIR."""
import json
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ms3seg_app.cli.run import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "bids_example"
EVIL = "<script>alert('x')</script>"


@pytest.fixture()
def hostile_dataset(tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    side = bids / "sub-02" / "anat" / "sub-02_FLAIR.json"
    meta = json.loads(side.read_text())
    # a field that is copied (escaped in the report) and free text that is not copied at all
    meta.update({"ManufacturersModelName": EVIL, "SeriesDescription": "Doe^Jane FLAIR", "PatientName": "Doe^Jane",
                 "PatientBirthDate": "19700101"})
    side.write_text(json.dumps(meta))
    return bids


def test_report_escapes_and_drops_identifying_fields(hostile_dataset, tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("network access attempted during a run")

    # offline: any connection fails loudly (patching the method keeps socket.socket a class,
    # which libraries such as PySocks subclass at import time)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = tmp_path / "out"
    rc = main([str(hostile_dataset), str(out), "participant", "--participant-label", "02",
               "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu"])
    assert rc == 0
    html = (out / "sub-02.html").read_text()
    assert EVIL not in html and "&lt;script&gt;" in html
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".tsv", ".html"):
            text = p.read_text()
            assert "Doe^Jane" not in text and "19700101" not in text, p


def test_storage_order_gives_same_world_segmentation(tmp_path):
    """The same FLAIR stored sagittally / flipped segments to the same world labels."""
    from ms3seg_app.model.predict import Predictor

    img = nib.load(str(EXAMPLE / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"))
    img = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
    pred = Predictor.load()
    ref = pred.predict_image(img).dseg
    assert (ref > 0).any()
    for ornt in ([[2, 1], [0, -1], [1, 1]], [[0, -1], [1, -1], [2, 1]]):
        ornt = np.array(ornt, float)
        other = img.as_reoriented(ornt)
        d = pred.predict_image(other).dseg
        # bring the labels back to the original storage order and compare voxel by voxel
        back = nib.Nifti1Image(d, other.affine).as_reoriented(nib.orientations.io_orientation(
            np.linalg.inv(img.affine) @ other.affine))
        np.testing.assert_allclose(back.affine, img.affine, atol=1e-6)
        agree = np.mean(np.asarray(back.dataobj) == ref)
        assert agree > 0.999
