"""Issue 14: ``--members`` runs a subset of the ensemble (nnU-Net's ``-f``), and says so everywhere."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from test_structure import _model


def _ensemble(tmp_path, n=3):
    from ms3seg_app.model.card import write_ensemble_card
    from ms3seg_app.training.train import TrainConfig, default_card

    files = [_model(tmp_path / f"m{i}.keras", seed=i + 1) for i in range(n)]
    return write_ensemble_card(default_card(TrainConfig(base_filters=4)), files, tmp_path / "ens_model_card.json")


def test_parser_sorts_members_and_refuses_an_index_the_card_lacks(tmp_path, capsys):
    from ms3seg_app.cli.parser import parse_args

    opts = parse_args([str(ROOT / "bids_example"), str(tmp_path / "o"), "participant", "--members", "2", "0", "0"])
    assert opts.members == [0, 2]
    with pytest.raises(SystemExit) as e:  # the bundled card has 3 members, 0-2
        parse_args([str(ROOT / "bids_example"), str(tmp_path / "o"), "participant", "--members", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--members: members 3 asked for" in err and "numbered 0-2" in err and len(err.splitlines()) == 1


def test_card_member_indices_and_loading_a_subset(tmp_path):
    from ms3seg_app.exceptions import ModelError
    from ms3seg_app.model.card import load_card
    from ms3seg_app.model.predict import Predictor

    cp = _ensemble(tmp_path)
    card = load_card(cp)
    assert card.member_indices() == (0, 1, 2) and card.member_indices([2]) == (2,)
    assert card.member_indices([2, 0, 2]) == (0, 2)  # sorted, once each
    for bad in ([3], [-1], []):
        with pytest.raises(ModelError, match="numbered 0-2"):
            card.member_indices(bad)
    full = Predictor.load(cp, tta=False)
    sub = Predictor.load(cp, tta=False, members=[2])
    assert sub.member_indices == (2,) and full.member_indices == (0, 1, 2) and len(sub.models) == 1
    x = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32) + 0.2
    # the loaded network is member 2's: the same output as member 2 of the full ensemble alone
    alone = Predictor.from_model(full.models[2], card.data, tta=False).predict_slices(x)[0]
    np.testing.assert_allclose(sub.predict_slices(x)[0], alone, atol=1e-6)
    assert not np.allclose(alone, Predictor.from_model(full.models[0], card.data, tta=False).predict_slices(x)[0])


def test_single_network_has_no_uncertainty_map_and_its_lesions_say_na(tmp_path):
    from ms3seg_app.lesions import lesion_table
    from ms3seg_app.model.predict import Predictor

    cp = _ensemble(tmp_path, 2)
    data = np.zeros((40, 40, 6), np.float32)
    data[8:32, 8:32, 1:5] = 100.0 + 20.0 * np.random.default_rng(0).random((24, 24, 4))
    img = nib.Nifti1Image(data, np.eye(4))
    assert Predictor.load(cp, tta=False, members=[1]).predict_image(img).uncertainty is None
    assert Predictor.load(cp, tta=False).predict_image(img).uncertainty is not None
    dseg = np.zeros((20, 20, 5), np.uint8)
    dseg[3:6, 3:6, 1:3] = 3
    t = lesion_table(dseg, np.eye(4), uncertainty=None)
    assert len(t) == 1 and np.isnan(t["uncertainty"].iloc[0])


def test_run_key_keeps_old_results_valid_and_tells_member_sets_apart():
    """All members (the default) gives the key that the same options gave before --members
    existed; any subset gives another key, so switching recomputes instead of reusing. The
    crop is always in the key: runs made with the previous crop rule (one crop for the whole
    stack) are recomputed, and head and brain crops are told apart."""
    import hashlib
    from dataclasses import asdict

    from ms3seg_app import __version__
    from ms3seg_app.model.card import load_card
    from ms3seg_app.participant import RunOptions, run_key

    card = load_card()
    old = {k: v for k, v in asdict(RunOptions()).items() if k != "members"}
    before = hashlib.sha256(json.dumps({"model_card_sha256": card.sha256, "ms3seg_app": __version__, **old},
                                       sort_keys=True).encode()).hexdigest()
    assert run_key(card, RunOptions()) == before
    keys = {run_key(card, RunOptions(members=m)) for m in (None, (0,), (1,), (0, 1))}
    assert len(keys) == 4
    # the same set given otherwise is the same run; all members given explicitly is the default
    assert run_key(card, RunOptions(members=(1, 0, 0))) == run_key(card, RunOptions(members=(0, 1)))
    assert run_key(card, RunOptions(members=(0, 1, 2))) == before
    assert run_key(card, RunOptions(crop="brain")) not in keys | {before}
    stack_crop = {k: v for k, v in old.items() if k != "crop"}  # sidecars before per-slice crops
    assert run_key(card, RunOptions()) != hashlib.sha256(json.dumps(
        {"model_card_sha256": card.sha256, "ms3seg_app": __version__, **stack_crop}, sort_keys=True).encode()).hexdigest()


def test_group_flags_the_minority_setting_and_every_row_of_an_even_mix():
    from ms3seg_app.group import add_qc_flags

    def frame(members):
        return pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(len(members))], "icv_ml": 1400.0,
                             "abnormal_wmh_ml": 5.0, "source_sha256": [str(i) for i in range(len(members))],
                             "model_sha256": "abc", "model_members": members})

    assert add_qc_flags(frame(["", "", "0"]))["qc_model_differs"].tolist() == [False, False, True]
    assert add_qc_flags(frame(["", "0"]))["qc_model_differs"].tolist() == [True, True]
    assert not add_qc_flags(frame(["", ""]))["qc_model_differs"].any()


def test_members_run_end_to_end_recorded_and_flagged_by_the_group(tmp_path):
    from ms3seg_app.cli.run import main

    cp = _ensemble(tmp_path)
    out = tmp_path / "out"
    common = ["--skull-strip", "none", "--skip-bids-validation", "--device", "cpu", "--model", str(cp)]
    bids = str(ROOT / "bids_example")
    assert main([bids, str(out), "participant", "--participant-label", "01", *common]) == 0
    assert main([bids, str(out), "participant", "--participant-label", "02", "--members", "1", *common]) == 0
    side = json.loads((out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.json").read_text())
    assert side["ModelMembers"] == 3 and side["ModelMembersUsed"] == [1]
    les = pd.read_csv(out / "sub-02/anat/sub-02_space-orig_desc-trimask_lesions.tsv", sep="\t")
    assert les.empty or les["uncertainty"].isna().all()
    assert "a single network (member 1 of the model" in (out / "sub-02.html").read_text()
    full = json.loads(next((out / "sub-01").rglob("*_desc-trimask_dseg.json")).read_text())
    assert full["ModelMembersUsed"] == [0, 1, 2]
    # another member set is another result: not skipped as complete
    before = (out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.json").stat().st_mtime_ns
    assert main([bids, str(out), "participant", "--participant-label", "02", *common]) == 0
    side = json.loads((out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.json").read_text())
    assert side["ModelMembersUsed"] == [0, 1, 2]
    assert (out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.json").stat().st_mtime_ns != before
    # the group flags a FLAIR made with other members than most
    assert main([bids, str(out), "participant", "--participant-label", "02", "--members", "0", *common]) == 0
    assert main([bids, str(out), "group"]) == 0
    df = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", dtype={"participant_id": str})
    flagged = {p for p, f in zip(df["participant_id"], df["qc_flags"].fillna("")) if "other model, members or inference options" in f}
    assert flagged == {"sub-02"}, df[["participant_id", "model_members", "qc_flags"]]


def test_ensemble_with_a_brain_mask_on_flipped_storage_keeps_its_uncertainty_in_the_box(tmp_path):
    """With a brain mask, probabilities and uncertainty are held for the mask's box (flipped,
    permuted storage): inside the mask they are the maskless run's, outside the box the
    whole-grid arrays are background (1, 0, ...) and 0; an empty mask gives empty boxes,
    an all-background tri-mask and whole-grid maps of background."""
    from ms3seg_app.derivatives import probability_image
    from ms3seg_app.distance import bounding_box
    from ms3seg_app.model.predict import Predictor

    pred = Predictor.load(_ensemble(tmp_path, 2), tta=False)
    rng = np.random.default_rng(3)
    data = np.zeros((44, 40, 8), np.float32)
    data[6:38, 5:35, 1:7] = 100.0 + 30.0 * rng.random((32, 30, 6))
    aff = np.diag([-1.0, 1.0, 4.0, 1.0])  # L-R flipped storage
    img = nib.Nifti1Image(data, aff).as_reoriented(np.array([[1, 1], [0, -1], [2, 1]], float))
    mask = np.zeros(img.shape, bool)
    mask[8:30, 10:34, 2:6] = True
    mask[8, 10, 2] = False
    full = pred.predict_image(img)
    boxed = pred.predict_image(img, mask)
    assert boxed.box == bounding_box(mask) and boxed.box_uncertainty.shape == boxed.box_probabilities.shape[:3]
    np.testing.assert_allclose(boxed.uncertainty[mask].astype(float), full.uncertainty[mask].astype(float), atol=2e-3)
    np.testing.assert_allclose(boxed.probabilities[mask].astype(float), full.probabilities[mask].astype(float),
                               atol=2e-3)
    outside = np.ones(img.shape, bool)
    outside[boxed.box] = False
    assert (boxed.uncertainty[outside] == 0).all() and (boxed.probabilities[outside][:, 0] == 1).all()
    assert (boxed.probabilities[outside][:, 1:] == 0).all()
    empty = pred.predict_image(img, np.zeros(img.shape, bool))
    assert empty.box_probabilities.size == 0 and not empty.dseg.any()
    assert (empty.probability(0) == 1).all() and (empty.probabilities[..., 1:] == 0).all()
    assert not empty.uncertainty.any()
    assert not np.asarray(probability_image(empty.box_probabilities[..., 3], img, empty.box).dataobj).any()
    background = probability_image(empty.box_probabilities[..., 0], img, empty.box, outside=empty.outside[0])
    assert (np.asarray(background.dataobj) == 255).all()  # 1 with the slope 1/255
    np.testing.assert_array_equal(boxed.outside, [1, 0, 0, 0])


def _head(seed=5):
    rng = np.random.default_rng(seed)
    data = np.zeros((40, 44, 6), np.float32)
    data[5:35, 6:38, 1:5] = 100.0 + 30.0 * rng.random((30, 32, 4))
    return nib.Nifti1Image(data, np.diag([1.0, 1.0, 4.0, 1.0]))


def test_background_load_serves_the_model_slices_at_once_and_the_same_prediction_after(tmp_path, monkeypatch):
    """``Predictor.load(background=True)`` (the CLI's serial run): card, members and model slices
    are there while the networks still load; the load starts once the first slices are made
    (not beside the slicing: both hold Python's lock); inference waits for it
    (``waiting_for_model``) and gives what a load in the foreground gives."""
    import threading
    import time

    from ms3seg_app.model import predict
    from ms3seg_app.model.predict import Predictor

    cp = _ensemble(tmp_path, 2)
    gate, load, started = threading.Event(), predict.load_members, threading.Event()

    def held(*args, **kwargs):
        started.set()
        assert gate.wait(120), "the test never let the networks load"
        return load(*args, **kwargs)

    monkeypatch.setattr(predict, "load_members", held)
    bg = Predictor.load(cp, tta=False, background=True)
    time.sleep(0.5)
    assert not started.is_set(), "the networks' load started before any slices were made"
    img = _head()
    slices = bg.prepare(img)  # the load starts here, and is held back
    assert started.wait(30), "prepare() did not start the networks' load"
    assert bg.member_indices == (0, 1) and bg.card.n_classes == 4 and slices.x is not None
    gate.set()
    got = bg.predict_image(img, slices=slices)
    assert got.timings["waiting_for_model"] >= 0 and len(bg.models) == 2
    want = Predictor.load(cp, tta=False).predict_image(img)
    np.testing.assert_array_equal(got.dseg, want.dseg)
    np.testing.assert_allclose(got.box_probabilities.astype(float), want.box_probabilities.astype(float), atol=1e-3)
    np.testing.assert_allclose(got.box_uncertainty.astype(float), want.box_uncertainty.astype(float), atol=1e-3)


def test_background_load_refuses_a_tampered_member_at_once_and_raises_a_load_error_at_every_use(tmp_path,
                                                                                               monkeypatch):
    from ms3seg_app.exceptions import ModelError
    from ms3seg_app.model import predict
    from ms3seg_app.model.predict import Predictor

    (tmp_path / "a").mkdir()
    tampered = _ensemble(tmp_path / "a", 2)
    with open(tmp_path / "a" / "m1.keras", "ab") as fh:
        fh.write(b"x")
    calls = []
    monkeypatch.setattr(predict, "load_members", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelError, match="sha256"):  # checked before the thread starts: nothing loaded
        Predictor.load(tampered, background=True)
    assert not calls

    def refused(card, indices, allow_unverified=False, verified=False):
        assert verified  # the files were checked before the thread: not hashed twice
        raise ModelError("cannot load m0.keras: refused by Keras safe mode")

    monkeypatch.setattr(predict, "load_members", refused)
    (tmp_path / "b").mkdir()
    bg = Predictor.load(_ensemble(tmp_path / "b", 2), background=True)
    for _ in range(2):
        with pytest.raises(ModelError, match="safe mode"):
            bg.models
    with pytest.raises(ModelError, match="safe mode"):
        bg.predict_image(_head())
    from concurrent.futures import Future

    with pytest.raises(ValueError, match="member_indices"):  # a future alone does not say which members
        Predictor(bg.card, Future())
