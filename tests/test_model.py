import json

import numpy as np
import pytest

from conftest import needs_shared
from ms3seg_app.exceptions import ModelError
from ms3seg_app.model.card import load_model, write_card
from ms3seg_app.model.unet import build_unet


def test_unet_shapes_and_ms3seg_structure():
    m = build_unet((64, 64, 1), base_filters=4)
    assert m.output_shape == (None, 64, 64, 4)
    y = m.predict(np.zeros((2, 64, 64, 1), np.float32), verbose=0)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    names = [layer.__class__.__name__ for layer in m.layers]
    assert names.count("MaxPooling2D") == 4 and names.count("UpSampling2D") == 4
    assert names.count("Conv2D") == 2 * 9 + 1 and names.count("BatchNormalization") == 2 * 9
    # fully convolutional: any size divisible by 16
    m2 = build_unet((None, None, 1), base_filters=4)
    assert m2.predict(np.zeros((1, 48, 80, 1), np.float32), verbose=0).shape == (1, 48, 80, 4)


def _tiny_model(tmp_path):
    from ms3seg_app.training.train import TrainConfig, default_card

    m = build_unet((None, None, 1), base_filters=4)
    w = tmp_path / "tiny.keras"
    m.save(w)
    write_card(default_card(TrainConfig(base_filters=4)), w)
    return w


def test_loading_verifies_sha256(tmp_path):
    w = _tiny_model(tmp_path)
    models, card = load_model(w)
    assert len(models) == 1 and card.members[0].path == w and card.members[0].sha256
    with open(w, "ab") as fh:  # tamper
        fh.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_model(w)
    models, _ = load_model(w, allow_unverified=True)  # explicit opt-in still loads


def test_missing_card_and_wrong_class_count(tmp_path):
    w = _tiny_model(tmp_path)
    card_p = tmp_path / "tiny_model_card.json"
    card = json.loads(card_p.read_text())
    card["classes"] = card["classes"][:3]
    card_p.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="classes"):
        load_model(w)
    card_p.unlink()
    with pytest.raises(ModelError, match="card"):
        load_model(w)


def test_lesion_class_has_one_definition_for_inference_and_report():
    """The lesion class is the card's AWMH class, wherever it is numbered; a card without one
    is refused by the predictor's uncertainty and by the report alike (no fallback to the last class)."""
    from ms3seg_app.model.card import ClassInfo, ModelCard, class_index
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.reports import class_infos

    base = {"name": "swapped", "architecture": {"type": "unet2d"}, "input": {"shape": [None, None, None, 1]},
            "preprocessing": {"normalization": {"method": "minmax"}}}
    classes = [{"index": 0, "abbreviation": "BG"}, {"index": 1, "abbreviation": "AWMH"},
               {"index": 2, "abbreviation": "NWMH"}, {"index": 3, "abbreviation": "VEN"}]
    card = ModelCard.from_dict({**base, "classes": classes})
    assert card.lesion_class == 1
    assert Predictor(card, [object()]).uncertainty_class == 1
    plain = ModelCard.from_dict({**base, "classes": [{"index": i} for i in range(4)]})
    with pytest.raises(ModelError, match="no class 'AWMH'"):
        Predictor(plain, [object()]).uncertainty_class
    with pytest.raises(ModelError, match="no class 'AWMH'"):  # an ensemble's spread needs it: refused at once
        Predictor(plain, [object(), object()])
    with pytest.raises(ModelError, match="report.*no class 'AWMH'"):
        class_index(plain.classes, "AWMH", "the report's class table")
    assert class_index(class_infos(None), "AWMH") == 3  # the MS3SEG tri-mask by default
    assert class_index((ClassInfo(0, "bg", "BG", "#000000"), ClassInfo(1, "l", "AWMH", "#ff0000")), "AWMH") == 1


def test_lambda_layer_refused_by_safe_mode(tmp_path):
    import keras

    from ms3seg_app.training.train import TrainConfig, default_card

    inp = keras.Input((None, None, 1))
    out = keras.layers.Lambda(lambda t: keras.ops.concatenate([t] * 4, axis=-1))(inp)
    w = tmp_path / "evil.keras"
    keras.Model(inp, out).save(w)
    write_card(default_card(TrainConfig()), w)
    with pytest.raises(ModelError, match="safe mode|cannot load"):
        load_model(w)


@needs_shared
def test_few_training_steps_on_real_slices_lower_the_loss(shared_data):
    import keras

    from ms3seg_app.model.losses import MarginalDiceCE
    from ms3seg_app.training.dataset import pack_targets, volume_to_slices
    from ms3seg_app.training.readers import read_trimask_sample
    from ms3seg_app.training.train import PREPROCESSING

    keras.utils.set_random_seed(0)
    vol = read_trimask_sample(shared_data / "trimask_sample")[0]
    s = volume_to_slices(vol, PREPROCESSING)
    keep = (s.labels > 0).reshape(len(s), -1).any(1)
    x = s.images[keep][:6, 64:192, 64:192, None]
    y = pack_targets(s.labels[keep][:6, 64:192, 64:192], s.annotated[keep][:6])
    m = build_unet((None, None, 1), base_filters=4)
    m.compile(keras.optimizers.Adam(3e-3), loss=MarginalDiceCE())
    hist = m.fit(x, y, epochs=15, batch_size=6, verbose=0).history["loss"]
    assert np.mean(hist[-3:]) < 0.9 * np.mean(hist[:3])  # training-mode loss falls


def _ms3seg_style_unet(filters):
    """The published MS3SEG U-Net's layer recipe (models/unet.py of Mahdi-Bashiri/MS3SEG):
    Keras default names, biased convolutions, as a legacy tf.keras .h5 would hold it."""
    import keras
    from keras import layers as L

    def block(x, f):
        for _ in range(2):
            x = L.Conv2D(f, 3, padding="same", kernel_initializer="he_normal")(x)
            x = L.BatchNormalization()(x)
            x = L.Activation("relu")(x)
        return x

    inp = L.Input((256, 256, 1))
    skips, x = [], inp
    for lvl in range(4):
        x = block(x, filters * 2**lvl)
        skips.append(x)
        x = L.MaxPooling2D(2)(x)
    x = block(x, filters * 16)
    for lvl in reversed(range(4)):
        x = L.concatenate([L.UpSampling2D(2)(x), skips[lvl]], axis=-1)
        x = block(x, filters * 2**lvl)
    return keras.Model(inp, L.Conv2D(4, 1, activation="softmax")(x))


def test_ms3seg_h5_weights_load_through_the_same_path(tmp_path):
    """A legacy .h5 of the MS3SEG architecture loads via load_model + card and predicts the same."""
    import json

    from ms3seg_app.model.card import sha256_file

    ref = _ms3seg_style_unet(4)
    h5 = tmp_path / "ms3seg_unet.h5"
    ref.save(h5)  # legacy HDF5 format, as tf.keras 2 wrote the published checkpoints
    card = {"name": "MS3SEG U-Net (published)", "sha256": sha256_file(h5),
            "architecture": {"type": "unet2d", "base_filters": 4, "depth": 4, "conv_bias": True},
            "input": {"shape": [None, 256, 256, 1]},
            "preprocessing": {"pixel_size_mm": 1.0, "slice_size": 256, "normalization": {"method": "minmax"}},
            "classes": [{"index": i} for i in range(4)]}
    (tmp_path / "ms3seg_unet_model_card.json").write_text(json.dumps(card))
    (model,), card = load_model(h5)
    assert card.architecture["conv_bias"] is True and card.members[0].path == h5
    x = np.random.default_rng(0).random((1, 256, 256, 1)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), ref.predict(x, verbose=0), atol=1e-5)


def test_inference_model_is_saved_without_optimizer_state(tmp_path):
    """A trained, compiled model is written with weights only (the bundled file stays small)."""
    import zipfile

    import h5py
    import keras

    from ms3seg_app.training.train import save_inference_model

    keras.utils.set_random_seed(0)
    model = build_unet((None, None, 1), base_filters=4)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype("float32")
    y = np.eye(4, dtype="float32")[np.random.default_rng(1).integers(0, 4, (2, 32, 32))]
    model.fit(x, y, epochs=1, verbose=0)
    path = save_inference_model(model, tmp_path / "m.keras")
    with zipfile.ZipFile(path) as z:
        z.extract("model.weights.h5", tmp_path)
        assert not json.loads(z.read("config.json")).get("compile_config")
    with h5py.File(tmp_path / "model.weights.h5") as h:
        assert "optimizer" not in h
    model.save(tmp_path / "full.keras")
    assert path.stat().st_size < 0.5 * (tmp_path / "full.keras").stat().st_size
    loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_single_network_without_a_lesion_class_still_predicts(tmp_path):
    """A card whose classes carry no abbreviations (MS3SEG's published .h5 card) predicts
    with one network: its spread is 0 and does not ask which class is the lesion."""
    from ms3seg_app.model.card import ModelCard
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.model.unet import build_unet

    card = ModelCard.from_dict({"name": "plain", "architecture": {"type": "unet2d"},
                                "input": {"shape": [None, None, None, 1]},
                                "preprocessing": {"normalization": {"method": "minmax"}},
                                "classes": [{"index": i} for i in range(4)]})
    pred = Predictor(card, [build_unet((None, None, 1), base_filters=4)], tta=False)
    x = np.zeros((3, 32, 32), np.float32)
    x[:, 8:24, 8:24] = 1.0
    mean, spread = pred.predict_slices(x)
    assert mean.shape == (3, 32, 32, 4) and not spread.any()
