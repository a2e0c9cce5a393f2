"""Issue 11: one source of truth (model card), a cache that cannot lie, one lesion definition."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT


def _model(path, base_filters=4, seed=0, **card_changes):
    import keras

    from ms3seg_app.model.card import write_card
    from ms3seg_app.model.unet import build_unet
    from ms3seg_app.training.train import TrainConfig, default_card

    keras.utils.set_random_seed(seed)
    build_unet((None, None, 1), base_filters=base_filters).save(path)
    card = default_card(TrainConfig(base_filters=base_filters))
    card.update(card_changes)
    write_card(card, path)
    return path


def test_changing_the_model_with_a_shared_work_dir_gives_the_fresh_result(tmp_path):
    """The reported bug: new weights + same -w must not serve the old model's segmentation."""
    from ms3seg_app.cli.run import main

    m1, m2 = _model(tmp_path / "a.keras", seed=1), _model(tmp_path / "b.keras", seed=2)
    work = tmp_path / "work"
    common = ["--participant-label", "02", "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu",
              "--no-reports", "-w", str(work)]
    assert main([str(ROOT / "bids_example"), str(tmp_path / "o1"), "participant", "--model", str(m1), *common]) == 0
    assert main([str(ROOT / "bids_example"), str(tmp_path / "o2"), "participant", "--model", str(m2), *common]) == 0
    assert main([str(ROOT / "bids_example"), str(tmp_path / "fresh"), "participant", "--model", str(m2),
                 *common[:-2]]) == 0
    rel = "sub-02/anat/sub-02_space-orig_label-AWMH_probseg.nii.gz"
    shared, fresh = (np.asanyarray(nib.load(tmp_path / d / rel).dataobj) for d in ("o2", "fresh"))
    first = np.asanyarray(nib.load(tmp_path / "o1" / rel).dataobj)
    assert np.array_equal(shared, fresh) and not np.array_equal(shared, first)
    from ms3seg_app.model.card import load_card

    side = json.loads((tmp_path / "o2" / rel.replace("label-AWMH_probseg.nii.gz", "desc-trimask_dseg.json"))
                      .read_text())
    assert side["ModelSHA256"] == load_card(m2).sha256 != load_card(m1).sha256


def test_rerun_with_another_model_into_the_same_output_recomputes(tmp_path):
    from ms3seg_app.cli.run import main

    m1, m2 = _model(tmp_path / "a.keras", seed=1), _model(tmp_path / "b.keras", seed=2)
    out = tmp_path / "o"
    args = [str(ROOT / "bids_example"), str(out), "participant", "--participant-label", "02", "--skull-strip",
            "none", "--skip-bids-validation", "--device", "cpu", "--no-reports"]
    assert main([*args, "--model", str(m1)]) == 0
    side = out / "sub-02/anat/sub-02_space-orig_desc-trimask_dseg.json"
    first = json.loads(side.read_text())["ModelSHA256"]
    assert main([*args, "--model", str(m2)]) == 0
    assert json.loads(side.read_text())["ModelSHA256"] != first


@pytest.mark.parametrize("change, match", [
    ({"classes": [{"index": 0, "name": "bg"}, {"index": 1, "name": "x"}, {"index": 2, "name": "y"}]}, "outputs 4"),
    ({"input": {"shape": [None, None, None, 3]}}, "channel"),
    ({"architecture": {"type": "transformer"}}, "architecture"),
    ({"classes": [{"index": 0}, {"index": 2}]}, "0..n-1"),
])
def test_card_that_disagrees_with_the_network_is_refused(tmp_path, change, match):
    from ms3seg_app.exceptions import ModelError
    from ms3seg_app.model.card import load_model

    w = _model(tmp_path / "m.keras", **change)
    with pytest.raises(ModelError, match=match):
        load_model(w)


def test_ensemble_card_loads_every_member_and_averages(tmp_path):
    from ms3seg_app.model.card import load_card, write_ensemble_card
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.training.train import TrainConfig, default_card

    a, b = _model(tmp_path / "a.keras", seed=1), _model(tmp_path / "b.keras", seed=2)
    cp = write_ensemble_card(default_card(TrainConfig(base_filters=4)), [a, b], tmp_path / "ens_model_card.json")
    card = load_card(cp)
    assert [m.path.name for m in card.members] == ["a.keras", "b.keras"]
    ens = Predictor.load(cp, tta=False)
    x = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32) + 0.2
    mean, spread = ens.predict_slices(x)
    singles = [Predictor.from_model(m, card.data, tta=False).predict_slices(x)[0] for m in ens.models]
    np.testing.assert_allclose(mean, np.mean(singles, axis=0), atol=1e-5)
    np.testing.assert_allclose(spread, np.std([s[..., 3] for s in singles], axis=0), atol=1e-5)
    same = Predictor(card, [ens.models[0], ens.models[0]], tta=False)
    assert float(same.predict_slices(x)[1].max()) == 0.0      # identical members: no uncertainty
    assert len(ens._graphs) == 1                              # one traced graph for both members


def test_ensemble_of_different_architectures_and_tta(tmp_path):
    """Members of different widths each get their graph; TTA averages the flipped prediction."""
    from ms3seg_app.model.card import load_card, write_ensemble_card
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.training.train import TrainConfig, default_card

    a, b = _model(tmp_path / "a.keras", base_filters=4, seed=1), _model(tmp_path / "b.keras", base_filters=8, seed=2)
    cp = write_ensemble_card(default_card(TrainConfig(base_filters=4)), [a, b], tmp_path / "ens_model_card.json")
    x = np.random.default_rng(1).random((5, 64, 48)).astype(np.float32) + 0.2
    ens = Predictor.load(cp, tta=True)
    mean, _ = ens.predict_slices(x)
    import keras

    if keras.backend.backend() == "tensorflow":
        assert len(ens._graphs) == 2
    want = []
    for m in ens.models:
        p = np.asarray(m(x[..., None], training=False))
        pf = np.asarray(m(x[:, ::-1, :, None], training=False))[:, ::-1]
        want.append(0.5 * (p + pf))
    np.testing.assert_allclose(mean, np.mean(want, axis=0), atol=1e-5)
    assert load_card(cp).members[1].path.name == "b.keras"


def test_one_lesion_definition_in_table_metrics_and_card():
    """A 2-voxel lesion of 4 mm³ counts the same in the lesion table, the metrics and the card."""
    from ms3seg_app.evaluation.metrics import evaluate_dseg
    from ms3seg_app.lesion_definition import LESION
    from ms3seg_app.lesions import lesion_table, volume_table

    dseg = np.zeros((20, 20, 10), np.uint8)
    dseg[5, 5, 5] = dseg[5, 6, 5] = 3            # 2 voxels x 2 mm³ = 4 mm³ >= 3 mm³
    affine = np.diag([1.0, 2.0, 1.0, 1.0])        # 2 mm³ voxels
    table = lesion_table(dseg, affine)
    assert len(table) == 1 and table["volume_mm3"].iloc[0] == pytest.approx(4.0)
    assert volume_table(dseg, affine, table)["lesion_count"] == 1
    row = [r for r in evaluate_dseg(dseg, dseg, (1.0, 2.0, 1.0)) if r["class"] == 3][0]
    assert row["n_true_lesions"] == row["n_pred_lesions"] == 1
    one = dseg.copy()
    one[5, 6, 5] = 0                               # 2 mm³: not a lesion anywhere
    assert len(lesion_table(one, affine)) == 0
    assert [r for r in evaluate_dseg(one, one, (1.0, 2.0, 1.0)) if r["class"] == 3][0]["n_true_lesions"] == 0
    import inspect

    import ms3seg_app.training.validate as validate_mod

    assert "LESION.to_dict()" in inspect.getsource(validate_mod.validate)  # the card's CV block
    assert LESION.to_dict() == {"connectivity": 26, "min_volume_mm3": 3.0}


def test_stage_bug_keeps_its_type_and_traceback_reaches_logs(tmp_path, monkeypatch, tiny_model):
    from ms3seg_app.cli import run
    import ms3seg_app.lesions as lesions_mod

    def broken(*a, **k):
        raise ZeroDivisionError("synthetic bug in the lesion stage")

    monkeypatch.setattr(lesions_mod, "lesion_table", broken)
    out = tmp_path / "o"
    rc = run.main([str(ROOT / "bids_example"), str(out), "participant", "--participant-label", "02",
                   "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu", "--no-reports",
                   "--model", str(tiny_model)])
    assert rc == 1
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert len(crash) == 1
    text = crash[0].read_text()
    assert "ZeroDivisionError: synthetic bug in the lesion stage" in text and "Traceback" in text
    assert "internal error in stage 'lesion_analysis'" in text
    assert not (out / "sub-02").exists() or not list((out / "sub-02").rglob("*_dseg.json"))


def test_derivative_names_come_from_one_module(tmp_path):
    from ms3seg_app.derivatives import crash_log_path, flair_outputs, output_prefix, prefix_from_crash_log

    ents = {"subject": "01", "session": "2", "acquisition": "3d", "run": "1"}
    p = flair_outputs(ents, tmp_path, ["VEN", "AWMH"], ["T1w"])
    assert p["dseg"].name == "sub-01_ses-2_acq-3d_run-1_space-orig_desc-trimask_dseg.nii.gz"
    assert p["probseg_AWMH_json"].name == "sub-01_ses-2_acq-3d_run-1_space-orig_label-AWMH_probseg.json"
    assert p["report"] == tmp_path / "sub-01_ses-2_acq-3d_run-1.html"
    assert p["dseg"].parent == tmp_path / "sub-01" / "ses-2" / "anat"
    prefix = output_prefix(ents)
    assert prefix_from_crash_log(crash_log_path(tmp_path, prefix, "20260101-101010_abcd1234")) == prefix


def test_group_uses_the_card_each_sidecar_names(tmp_path):
    """Geometry QC follows the model that made each result, not the bundled one."""
    import pandas as pd

    from ms3seg_app.cli.run import main

    narrow = _model(tmp_path / "narrow.keras", training_geometry={"slice_thickness_mm": [0.5, 2.0],
                                                                  "inplane_mm": [0.5, 2.0]})
    out = tmp_path / "o"
    assert main([str(ROOT / "bids_example"), str(out), "participant", "--participant-label", "02", "--skull-strip",
                 "none", "--skip-bids-validation", "--device", "cpu", "--no-reports", "--model", str(narrow)]) == 0
    assert list((out / "models").glob("*_model_card.json"))
    assert main([str(ROOT / "bids_example"), str(out), "group"]) == 0
    df = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t")
    assert bool(df["qc_geometry"].iloc[0]) and "geometry outside training" in df["qc_flags"].iloc[0]


def _clinical_like(seed: int):
    """A 60x70x12 volume of 1x1x5 mm voxels, noisy tissue in a box: (data float32, image)."""
    rng = np.random.default_rng(seed)
    data = np.zeros((60, 70, 12), np.float32)
    data[10:50, 10:60, :] = 300 + 50 * rng.random((40, 50, 12))
    return data, nib.Nifti1Image(data, np.diag([1.0, 1.0, 5.0, 1.0]))


def test_slices_without_brain_are_not_run_and_change_nothing_inside_the_mask(tmp_path):
    """Inference skips slices outside the brain mask; inside the mask the result is unchanged."""
    from ms3seg_app.model.predict import Predictor

    pred = Predictor.load(_model(tmp_path / "m.keras", seed=3), tta=False)
    data, img = _clinical_like(seed=0)
    mask = np.zeros(data.shape, bool)
    mask[15:45, 15:55, 4:8] = True
    calls = []
    forward = pred.predict_slices
    pred.predict_slices = lambda x, run=None, *a, **kw: calls.append(run) or forward(x, run, *a, **kw)
    with_mask = pred.predict_image(img, mask)
    assert calls[0].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    full = pred.predict_image(img)
    # same slices, same crop: equal up to float16 rounding (batch composition differs)
    np.testing.assert_allclose(with_mask.probabilities[mask].astype(float), full.probabilities[mask].astype(float),
                               atol=2e-3)
    assert (with_mask.probabilities[~mask][:, 0] == 1).all() and (with_mask.dseg[~mask] == 0).all()
    # the tri-mask made inside the brain's box only is the whole volume's
    np.testing.assert_array_equal(with_mask.dseg, pred.postprocess(with_mask.probabilities, (1.0, 1.0, 5.0)))
    # probabilities and uncertainty are held for the brain's box only; the whole-grid arrays
    # are built from them on request
    assert with_mask.box == (slice(15, 45), slice(15, 55), slice(4, 8))
    assert with_mask.box_probabilities.shape == (30, 40, 4, 4)
    assert full.box == (slice(0, 60), slice(0, 70), slice(0, 12)) and full.box_probabilities.shape == (60, 70, 12, 4)
    np.testing.assert_array_equal(with_mask.probabilities[with_mask.box], with_mask.box_probabilities)
    np.testing.assert_array_equal(with_mask.probability(2), with_mask.probabilities[..., 2])


def test_slices_made_beforehand_give_the_same_prediction_and_serve_once(tmp_path):
    """The participant makes the model's slices before brain extraction (memory): the
    prediction is the one predict_image makes itself; the slices are freed by it, and slices
    of another image, or used ones, are refused."""
    from ms3seg_app.model.predict import Predictor

    pred = Predictor.load(_model(tmp_path / "m.keras", seed=5), tta=False)
    data, img = _clinical_like(seed=1)
    mask = np.zeros(data.shape, bool)
    mask[15:45, 15:55, 2:10] = True
    direct = pred.predict_image(img, mask)
    slices = pred.prepare(img)
    assert slices.x is not None and slices.shape == (60, 70, 12)
    early = pred.predict_image(img, mask, slices=slices)
    assert slices.x is None  # freed once run
    np.testing.assert_array_equal(early.dseg, direct.dseg)
    np.testing.assert_array_equal(early.box_probabilities, direct.box_probabilities)
    assert "slicing" in direct.timings and "slicing" not in early.timings
    with pytest.raises(ValueError, match="used already"):
        pred.predict_image(img, mask, slices=slices)
    other = nib.Nifti1Image(data[:, :, :10], img.affine)
    with pytest.raises(ValueError, match="another image"):
        pred.predict_image(other, slices=pred.prepare(img))
    # another image of the same shape (e.g. the FLAIR before N4) is refused as well
    same_shape = nib.Nifti1Image(data * 2.0, img.affine)
    with pytest.raises(ValueError, match=r"another image \(shape \(60, 70, 12\)\)"):
        pred.predict_image(same_shape, mask, slices=pred.prepare(img))


def test_predictor_reads_current_weights_of_a_network_still_training(tmp_path):
    """The compiled forward pass takes the weights at each call (per-epoch validation)."""
    import keras

    from ms3seg_app.model.predict import Predictor

    pred = Predictor.load(_model(tmp_path / "m.keras", seed=4), tta=False)
    x = np.random.default_rng(2).random((2, 64, 64)).astype(np.float32) + 0.2
    before = pred.predict_slices(x)[0]
    model = pred.models[0]
    model.set_weights([w * 1.5 for w in model.get_weights()])
    after = pred.predict_slices(x)[0]
    want = np.asarray(model(x[..., None], training=False))
    assert not np.allclose(before, after)
    # 1e-3: the compiled pass folds the batch norms (float32 rounding; this random network's
    # weights x 1.5 saturate the softmax), while stale weights would differ by far more
    np.testing.assert_allclose(after, want, atol=1e-3)
    assert keras.backend.backend() != "tensorflow" or len(pred._graphs) == 1


def test_subpixel_kernel_equals_convolution_of_the_upsampled_input():
    import tensorflow as tf

    from ms3seg_app.model.unet import subpixel_kernel

    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    want = tf.nn.conv2d(tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2), k, 1, "SAME")
    got = tf.nn.depth_to_space(tf.nn.conv2d(x, subpixel_kernel(k), 1, "SAME"), 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _random_statistics(model, rng, use_bias):
    import keras

    for layer in model.layers:  # batch-norm statistics and affine parameters away from 0/1
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, g.shape), rng.normal(0, 0.5, b.shape),
                               rng.normal(0, 0.5, m.shape), rng.uniform(0.2, 3, v.shape)])
        elif use_bias and isinstance(layer, keras.layers.Conv2D):
            k, bias = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 0.3, bias.shape)])


@pytest.mark.parametrize("use_bias", [False, True])
def test_inference_graph_of_the_unet_computes_the_network(use_bias, monkeypatch):
    """The traced inference graph (batch norms and up-sampling folded into convolutions)
    gives the Keras network's softmax, with and without flip TTA; an architecture that only
    looks like build_unet's (another activation) is run by Keras as is."""
    import keras
    import tensorflow as tf

    from ms3seg_app.model.predict import _stateless_graph, _unet_plan
    from ms3seg_app.model.unet import build_unet

    keras.utils.set_random_seed(6)
    model = build_unet((None, None, 1), base_filters=4, use_bias=use_bias)
    rng = np.random.default_rng(6)
    _random_statistics(model, rng, use_bias)
    assert _unet_plan(model) is not None
    import ms3seg_app.model.unet as unet

    traced = []  # True for a call in a traced graph (the plan's probe passes NumPy arrays)
    real = unet.inference_forward
    monkeypatch.setattr(unet, "inference_forward",
                        lambda w, t, *a: traced.append(not isinstance(t, np.ndarray)) or real(w, t, *a))
    import ms3seg_app.model.predict as predict

    # the U-Net path folds from the network's own weights: no copy of the network is made
    monkeypatch.setattr(predict, "fold_batch_norm", lambda m: pytest.fail("the U-Net was copied to be folded"))
    x = rng.random((3, 48, 80, 1)).astype(np.float32)
    spec = tf.TensorSpec([None, None, None, 1], tf.float32)
    tv, ntv = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
    want = np.asarray(model(x, training=False))  # sums in another order: float32 rounding up to ~1e-5
    np.testing.assert_allclose(np.asarray(_stateless_graph(model, spec, False)(tv, ntv, x)), want, atol=5e-5)
    flipped = np.asarray(model(x[:, ::-1], training=False))[:, ::-1]
    np.testing.assert_allclose(np.asarray(_stateless_graph(model, spec, True)(tv, ntv, x)), 0.5 * (want + flipped),
                               atol=5e-5)
    assert any(traced), "the folded U-Net graph was not used"
    monkeypatch.undo()

    model.get_layer("dec1_relu1").activation = keras.activations.get("tanh")  # same names, another function
    assert _unet_plan(model) is None  # caught by the numerical check
    model.get_layer("dec1_relu1").activation = keras.activations.get("relu")
    assert _unet_plan(model) is not None
    model.get_layer("enc0_conv1").activation = keras.activations.get("relu")  # conv -> ReLU -> batch norm
    assert _unet_plan(model) is None  # refused by its settings
    np.testing.assert_allclose(np.asarray(_stateless_graph(model, spec, False)(tv, ntv, x)),
                               np.asarray(model(x, training=False)), atol=5e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_batch_norms_folded_into_convolutions_compute_the_same_network(use_bias):
    """fold_batch_norm: same outputs as the network (ours: no conv bias; MS3SEG's .h5: bias)."""
    import keras

    from ms3seg_app.model.predict import fold_batch_norm
    from ms3seg_app.model.unet import build_unet

    keras.utils.set_random_seed(5)
    model = build_unet((None, None, 1), base_filters=4, use_bias=use_bias)
    rng = np.random.default_rng(5)
    _random_statistics(model, rng, use_bias)
    folded, weights = fold_batch_norm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    x = rng.random((2, 32, 48, 1)).astype(np.float32)
    tv, ntv = weights([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    got, _ = folded.stateless_call(tv, ntv, x, training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model(x, training=False)), atol=1e-5)
    plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3)])
    assert fold_batch_norm(plain) is None  # nothing to fold


def test_fold_batch_norm_reads_any_functional_graph():
    """Batch norms after an op (x + y), after a convolution used twice or after a convolution
    with its own activation stay; named (dict) outputs are read; the folded network computes
    the same; a conv feeding only its batch norm is folded, also a batch norm without scale
    and centre."""
    import keras
    from keras import layers

    from ms3seg_app.model.predict import fold_batch_norm

    keras.utils.set_random_seed(3)
    inp = keras.Input((None, None, 1))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inp)
    a_bn = layers.BatchNormalization(scale=False, center=False, name="a_bn")(a)  # foldable
    c = layers.Conv2D(4, 3, padding="same", activation="relu", name="c")(a_bn)
    c_bn = layers.BatchNormalization(name="c_bn")(c)            # after an activation: not foldable
    b = layers.Conv2D(4, 3, padding="same", name="b")(c_bn)
    b_bn = layers.BatchNormalization(name="b_bn")(b)            # b is also used below: not foldable
    s = layers.BatchNormalization(name="s_bn")(b + a_bn)        # after an op, not a layer
    out = layers.Conv2D(2, 1, name="out")(layers.Concatenate()([b_bn, s, b]))
    model = keras.Model(inp, {"seg": out, "aux": a_bn})
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, 4).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2, 4).astype(np.float32))
    folded, weights = fold_batch_norm(model)
    kept = {la.name for la in folded.layers if isinstance(la, layers.BatchNormalization)}
    assert kept == {"b_bn", "s_bn", "c_bn"}
    x = rng.random((1, 16, 16, 1)).astype(np.float32)
    tv, ntv = weights([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    got, _ = folded.stateless_call(tv, ntv, x, training=False)
    want = model(x, training=False)
    for k in ("seg", "aux"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-5)


def test_training_modules_import_one_way():
    """The command line imports the training library; the library never imports the command
    line, and train.py (which validate.py and bids_data.py build on) imports neither of them,
    so every import is at module level. The README's ``python -m ...train`` still runs it."""
    import ast
    import subprocess
    import sys

    import ms3seg_app.training as training

    root = Path(training.__file__).parent
    never = {"train": {"cli", "validate", "bids_data"}, "validate": {"cli", "bids_data"},
             "bids_data": {"cli", "validate"}}
    for mod, forbidden in never.items():
        tree = ast.parse((root / f"{mod}.py").read_text())
        main_block = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        used = set()
        for n in ast.walk(ast.Module([t for t in tree.body if t not in main_block], [])):
            if isinstance(n, ast.ImportFrom) and n.level == 1:  # from .x import y / from . import x
                used |= {n.module} if n.module else {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ms3seg_app.training."):
                used.add(n.module.rsplit(".", 1)[1])
            elif isinstance(n, ast.Import):
                used |= {a.name.rsplit(".", 1)[1] for a in n.names if a.name.startswith("ms3seg_app.training.")}
        assert not used & forbidden, (mod, used & forbidden)
    out = subprocess.run([sys.executable, "-m", "ms3seg_app.training.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "ensemble" in out.stdout and "bids" in out.stdout
