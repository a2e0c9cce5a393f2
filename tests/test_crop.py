"""Issue 14: each slice runs on its own in-plane crop (its head, or with ``--crop brain`` its
brain's box), recorded wherever the result is described."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from test_structure import _model


def _geometry(flip: bool):
    from ms3seg_app.preprocessing.geometry import SliceGeometry

    aff = np.diag([0.8, 1.3, 5.0, 1.0])
    if flip:  # stored left-to-right and inferior-to-superior reversed: the boxes are of RAS+ slices
        aff[0, 0], aff[2, 2] = -0.8, -5.0
    mask = np.zeros((90, 70, 9), bool)
    mask[20:61, 15:40, 2:6] = True
    mask[50:55, 45:50, 6] = True  # a small island alone on its slice
    img = nib.Nifti1Image(mask.astype(np.float32), aff)
    return SliceGeometry.from_image(img, pixel_size=1.0, size=96, centre_on=mask), mask


@pytest.mark.parametrize("flip", [False, True])
def test_slice_boxes_hold_every_pixel_the_mask_is_resampled_from_or_to(flip):
    geom, mask = _geometry(flip)
    boxes = geom.slice_boxes(mask)
    inside = np.zeros((geom.ras_shape[2], geom.size, geom.size), bool)
    for z, (r0, r1, c0, c1) in enumerate(boxes):
        inside[z, r0:r1, c0:c1] = True
    # forward: every pixel that linear interpolation gives any mask weight lies in its slice's box
    reached = geom.forward(mask.astype(np.float32), order=1) > 0
    assert reached.any() and not (reached & ~inside).any()
    # and the box is tight: at most one pixel wider than that reach on each side
    for z in np.nonzero(reached.any(axis=(1, 2)))[0]:
        rows, cols = np.nonzero(reached[z].any(axis=1))[0], np.nonzero(reached[z].any(axis=0))[0]
        r0, r1, c0, c1 = boxes[z]
        assert rows.min() - r0 <= 1 and r1 - 1 - rows.max() <= 1
        assert cols.min() - c0 <= 1 and c1 - 1 - cols.max() <= 1
    # inverse: no voxel of the mask reads a pixel outside the boxes
    back = geom.inverse((~inside).astype(np.float32), order=1)
    assert float(back[mask].max()) == 0.0
    # slices without mask voxels: empty boxes
    empty = ~geom.to_ras(mask).any(axis=(0, 1))
    assert empty.any() and (boxes[empty] == 0).all() and (boxes[~empty, 0] < boxes[~empty, 1]).all()


def test_head_boxes_and_crops_are_per_slice_multiples_of_16_with_the_margin():
    from ms3seg_app.model.predict import CROP_MARGIN_PX, head_boxes, slice_crops

    x = np.zeros((3, 128, 128, 1), np.float32)
    x[0, 40:60, 30:90] = 1.0
    x[2, 0:100, 5:128] = 1.0
    boxes = head_boxes(x)
    assert boxes.tolist() == [[40, 60, 30, 90], [0, 0, 0, 0], [0, 100, 5, 128]]
    crops = slice_crops(boxes, 128, 128)
    assert set(crops) == {0, 2}  # no head, not run
    for z, (r0, r1, c0, c1) in crops.items():
        assert (r1 - r0) % 16 == 0 and (c1 - c0) % 16 == 0 and 0 <= r0 and r1 <= 128 and 0 <= c0 and c1 <= 128
        b = boxes[z]
        assert r0 <= max(0, b[0] - CROP_MARGIN_PX) and r1 >= min(128, b[1] + CROP_MARGIN_PX)
        assert c0 <= max(0, b[2] - CROP_MARGIN_PX) and c1 >= min(128, b[3] + CROP_MARGIN_PX)
    assert crops[0] == (24, 88, 14, 110)  # rows 40-59 -> 24-75 -> 64 px; columns 30-89 -> 14-105 -> 96 px


def test_a_slice_gives_the_same_result_alone_or_in_a_stack(tmp_path):
    """A slice's result depends on its own crop only: batching slices of the same crop size
    together, or predicting the slice alone, changes nothing beyond float32 rounding."""
    from ms3seg_app.model.predict import Predictor

    pred = Predictor.load(_model(tmp_path / "m.keras", seed=5), tta=True)
    rng = np.random.default_rng(1)
    x = np.zeros((5, 128, 128), np.float32)
    x[0, 10:70, 20:80] = 1 + rng.random((60, 60))   # crop rows 0-96, columns 4-100
    x[1, 40:100, 40:100] = 1 + rng.random((60, 60))  # same crop size, elsewhere: rows and columns 24-120
    x[2, 30:50, 30:60] = 1 + rng.random((20, 30))   # smaller head: a 64 x 64 crop
    x[4, 5:120, 5:120] = 1 + rng.random((115, 115))  # the whole slice
    seen = []
    fns = pred._member_fns()
    pred._fns = [lambda b, f=f: seen.append(b.shape) or f(b) for f in fns]
    stack, _ = pred.predict_slices(x)
    assert sorted(seen) == [(1, 64, 64, 1), (1, 128, 128, 1), (2, 96, 96, 1)]
    assert (stack[3, ..., 0] == 1).all()  # no head: background, not run
    for z in (0, 1, 2, 4):
        alone, _ = pred.predict_slices(x[z:z + 1])
        np.testing.assert_allclose(alone[0], stack[z], atol=1e-5)
    # outside a slice's crop: background
    assert (stack[2, :14, :, 0] == 1).all() and (stack[2, 78:, :, 0] == 1).all()  # crop rows 14-78
    assert not (stack[2, 14:78, 14:78, 0] == 1).all()


def test_brain_crop_runs_each_slice_on_its_brains_box(tmp_path):
    from ms3seg_app.model.predict import Predictor

    with pytest.raises(ValueError, match="crop must be one of"):
        Predictor.load(_model(tmp_path / "bad.keras"), crop="skull")
    path = _model(tmp_path / "m.keras", seed=6)
    rng = np.random.default_rng(0)
    data = np.zeros((100, 100, 6), np.float32)
    data[5:95, 5:95, :] = 300 + 50 * rng.random((90, 90, 6))  # head filling the field of view
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 5.0, 1.0]))
    mask = np.zeros(data.shape, bool)
    mask[30:60, 40:70, 1:5] = True
    mask[30:40, 40:50, 4] = False
    shapes = {}
    for crop in ("head", "brain"):
        pred = Predictor.load(path, tta=False, crop=crop)
        fns = pred._member_fns()
        shapes[crop] = []
        pred._fns = [lambda b, f=f, s=shapes[crop]: s.append(b.shape) or f(b) for f in fns]
        out = pred.predict_image(img, mask)
        assert (out.probabilities[~mask][:, 0] == 1).all() and (out.dseg[~mask] == 0).all()
    # the head's crop: its 90 px box plus the margin, 128 px; slices 1-4 (those holding brain) run
    assert shapes["head"] == [(4, 128, 128, 1)]
    # the brain's box (30 px, +1 px of interpolation reach, + 16 px margin each side) -> 64 px
    assert shapes["brain"] == [(4, 64, 64, 1)]


def test_inference_options_and_the_group_flag():
    from ms3seg_app.group import add_qc_flags, inference_options

    assert inference_options({"InferenceCrop": "head"}) == ""
    assert inference_options({}) == inference_options({"InferenceCrop": None}) == "stack crop"  # older rule
    assert inference_options({"TestTimeAugmentation": True, "InferenceCrop": "head"}) == ""
    assert inference_options({"TestTimeAugmentation": False, "InferenceCrop": "brain"}) == "--no-tta --crop brain"
    df = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"], "icv_ml": 1400.0, "abnormal_wmh_ml": 5.0,
                       "source_sha256": ["a", "b", "c"], "model_sha256": "m", "model_members": "",
                       "inference_options": ["", "", "--crop brain"]})
    assert add_qc_flags(df)["qc_model_differs"].tolist() == [False, False, True]


def test_crop_brain_end_to_end_recorded_and_recomputed(tmp_path):
    from ms3seg_app.cli.run import main

    path = _model(tmp_path / "m.keras", seed=7)
    out = tmp_path / "out"
    common = ["--participant-label", "02", "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu",
              "--model", str(path)]
    side_path = out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.json"
    assert main([str(ROOT / "bids_example"), str(out), "participant", "--crop", "brain", *common]) == 0
    side = json.loads(side_path.read_text())
    assert side["InferenceCrop"] == "brain"
    assert "each slice cropped to the bounding box of its brain" in (out / "sub-02.html").read_text()
    dseg = nib.load(out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.nii.gz")
    assert dseg.shape == nib.load(ROOT / "bids_example/sub-02/anat/sub-02_FLAIR.nii.gz").shape
    before = side_path.stat().st_mtime_ns
    # the default crop is another result: recomputed, not skipped as complete
    assert main([str(ROOT / "bids_example"), str(out), "participant", *common]) == 0
    assert side_path.stat().st_mtime_ns != before
    assert json.loads(side_path.read_text())["InferenceCrop"] == "head"
    assert "cropped to the bounding box" not in (out / "sub-02.html").read_text()


def test_brain_crop_does_not_run_a_slice_without_head(tmp_path):
    from ms3seg_app.model.predict import Predictor

    pred = Predictor.load(_model(tmp_path / "m.keras", seed=8), tta=False, crop="brain")
    x = np.zeros((3, 64, 64), np.float32)
    x[0, 10:50, 10:50] = 1.5
    boxes = np.array([[20, 40, 20, 40], [20, 40, 20, 40], [0, 0, 0, 0]])  # slice 1: region, no head
    seen = []
    fns = pred._member_fns()
    pred._fns = [lambda b, f=f: seen.append(b.shape) or f(b) for f in fns]
    mean, _ = pred.predict_slices(x, boxes=boxes)
    assert seen == [(1, 64, 64, 1)] and (mean[1:, ..., 0] == 1).all()


def test_another_crop_reuses_the_loaded_model(tmp_path, monkeypatch):
    """One process's model is loaded once: jobs that differ only in --crop get the same
    networks with the job's crop (another TTA setting loads them again); a crop that does
    not exist is refused, also on a loaded model."""
    from ms3seg_app.cli import run
    from ms3seg_app.participant import RunOptions

    monkeypatch.setattr(run, "_WORKER", {})
    model = _model(tmp_path / "m.keras", seed=2)
    job = dict(model=model, allow_unverified=False, options=RunOptions(tta=False, crop="head"))
    first = run._predictor(job)
    assert first.crop == "head"
    brain = run._predictor({**job, "options": RunOptions(tta=False, crop="brain")})
    assert brain is first and brain.crop == "brain"
    assert run._predictor(job) is first and first.crop == "head"
    with pytest.raises(ValueError, match="crop must be one of"):
        run._predictor({**job, "options": RunOptions(tta=False, crop="Brain")})
    assert run._predictor({**job, "options": RunOptions(tta=True)}) is not first


def test_sources_name_the_file_inside_the_dataset_not_a_symlink_target(tmp_path):
    """DataLad/git-annex datasets link each file elsewhere: Sources, and the longitudinal step
    reading them back, use the path inside the dataset."""
    from ms3seg_app.derivatives import raw_path, raw_uri

    store, bids = tmp_path / "annex", tmp_path / "ds"
    store.mkdir()
    (bids / "sub-1" / "anat").mkdir(parents=True)
    (store / "blob").write_bytes(b"x")
    link = bids / "sub-1" / "anat" / "sub-1_FLAIR.nii.gz"
    link.symlink_to(store / "blob")
    uri = raw_uri(link, bids)
    assert uri == "bids:raw:sub-1/anat/sub-1_FLAIR.nii.gz"
    assert raw_path(uri, bids) == link and raw_path(uri, bids).read_bytes() == b"x"
    assert raw_uri(store / "blob", bids) == "bids:raw:blob"  # outside the dataset: the name alone
    with pytest.raises(ValueError, match="not a bids:raw: URI"):
        raw_path("sub-1/anat/sub-1_FLAIR.nii.gz", bids)
