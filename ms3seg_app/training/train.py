"""Training and subject-level cross-validation of the tri-mask U-Net.

Command line (:mod:`.cli`; ``python -m ms3seg_app.training.train --help`` or ``ms3seg-train --help``)::

    # k-fold cross-validation on the development data; the fold models are the shipped ensemble
    python -m ms3seg_app.training.train cv       --data ../shared/data --out work/cv_v2
    python -m ms3seg_app.training.train ensemble --data ../shared/data --cv work/cv_v2 --dest ms3seg_app/data
    # retrain / fine-tune on your own annotated BIDS dataset (manual dseg derivatives)
    python -m ms3seg_app.training.train bids  --bids-dir ds --labels-dir ds/derivatives/manual --out work/mine

Recipe (chosen for a 2-core CPU and ~240 labelled slices): U-Net of base width 16,
random 128x128 crops of 1 mm slices, batch 8, AdamW with a linear warm-up then cosine
decay, marginal Dice + cross-entropy (partial labels) + exclusion loss, strong
augmentation, class-balanced sampling of the rare normal-WMH labels (slices holding them
drawn 3 times per epoch, their voxels weighted 5 in the cross-entropy), the final weights
of a full cosine schedule (an inner validation subject is scored every epoch for the record). Model v2 adds
the external lesion slices of other sites (each fold holds one source out), the
tissue-mode intensity anchor and domain-randomised augmentation; the three fold models
are shipped as an ensemble (nnU-Net's recipe), validated by :mod:`.validate`.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import CLASSES, LABELS, LESION_CLASS, __version__
from .dataset import SliceSequence, SliceSet, png_slices_to_set, volume_to_slices
from .readers import (LabelledVolume, read_ms3seg_sample, read_mendeley_jpg, read_mssegsam_coco,
                      read_normal_wmh_png, read_trimask_sample)

LOGGER = logging.getLogger("ms3seg.training")

PREPROCESSING = {
    "pixel_size_mm": 1.0,
    "slice_size": 256,
    "normalization": {"method": "tissue_mode", "mode_value": 1.0, "clip_max": 4.0},
    "reorientation": "closest canonical RAS+ by axis permutation/flip (no interpolation); axial slices",
    "inplane_interpolation": "linear (image), nearest (labels); probabilities back by linear interpolation then argmax",
    "skull_stripped_input": "either: the tissue-mode anchor is the same with and without skull",
}

#: External 2D sources held out whole, one per cross-validation fold (leave-one-source-out):
#: fold i trains without ``EXTERNAL_HOLDOUT[i]`` and is scored on it. ``Mendeley`` is
#: never trained on (its raters label caps as lesion, and it has no patient ids).
EXTERNAL_HOLDOUT = {0: "MSLesSeg", 1: "PubMRI"}
VALIDATION_ONLY_SOURCES = ("Mendeley",)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    base_filters: int = 16
    epochs: int = 60
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-5
    warmup_epochs: int = 2
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    exclusion_weight: float = 1.0
    empty_fraction: float = 0.2
    nwmh_oversample: int = 3
    nwmh_ce_weight: float = 5.0
    patience: int = 15
    keep: str = "last"
    external_per_epoch: int = 64
    seed: int = 0


def default_card(cfg: TrainConfig) -> dict:
    """Model card skeleton for a model trained with ``cfg`` (sha256 filled on write)."""
    import keras
    import tensorflow as tf

    return {
        "name": f"ms3seg-app-unet{cfg.base_filters}-v2",
        "version": __version__,
        "format": "keras",
        "architecture": {"type": "unet2d", "reference": "MS3SEG U-Net (Bashiri Bawil et al., Sci Data 2025)",
                         "base_filters": cfg.base_filters, "depth": 4, "block": "conv3x3-BN-ReLU x2",
                         "upsampling": "UpSampling2D + concatenate", "head": "1x1 conv softmax",
                         "input_channels": 1, "conv_bias": False},
        "input": {"shape": [None, None, None, 1], "dtype": "float32", "axis_order": "NHWC",
                  "H_axis": "+x (towards Right) of the RAS+-reoriented image",
                  "W_axis": "+y (towards Anterior)", "slice_axis": "+z (Superior)",
                  "range": "[0, clip_max] after normalization"},
        "output": {"shape": [None, None, None, 4], "dtype": "float32", "activation": "softmax"},
        "preprocessing": PREPROCESSING,
        "postprocessing": {"nwmh_max_ventricle_distance_mm": 5.0,
                           "description": "normal-WMH components farther than this from the ventricles are "
                                          "given their next most probable class (ms3seg_app/trimask.py)"},
        "training_geometry": {"slice_thickness_mm": [1.0, 8.5], "inplane_mm": [0.7, 1.3],
                              "note": "2D FLAIR of 6.5-8 mm slices (11 patients of one 1.5 T scanner) and 1 mm "
                                      "slices of two 3 T/mixed-scanner MNI-registered patients (external lesion "
                                      "slices)"},
        "classes": [{"index": i, "name": n, "abbreviation": a, "color": c} for i, (n, a, c) in CLASSES.items()],
        "training": {"config": asdict(cfg),
                     "loss": "marginal cross-entropy + marginal soft Dice + exclusion loss "
                             "(Shi et al., MedIA 2021)",
                     "optimizer": "AdamW, linear warm-up then cosine decay",
                     "augmentation": "domain randomisation (SynthSeg-like, Billot et al. 2023): LR flip, "
                                     "rotation +-15 deg, scale 0.85-1.15, translation; skull stripped (p 0.3); "
                                     "anisotropic blur and down/up-sampling (resolution, thick-slice partial "
                                     "volume); gamma 0.6-1.6, gain 0.8-1.25, bias field +-35 %, Gaussian noise; "
                                     "random 128x128 crops"},
        "training_data": {
            "volumes": "MS3SEG cohort samples (Bashiri Bawil et al., Sci Data 2025), MIT-licensed repositories "
                       "Mahdi-Bashiri/MRI_MS_Insights@db0568d (ventricles + abnormal WMH, 9 usable patients), "
                       "Mahdi-Bashiri/Sim-Vent-WMH-Seg@914e4ed (all classes, 2 patients); Toshiba Vantage 1.5 T, "
                       "2D axial FLAIR 0.9x0.9x6.5-8 mm",
            "slices": "Mahdi-Bashiri/wmh-normal-abnormal-segmentation@286121b (20 slices, normal + abnormal WMH); "
                      "WholeNow/MSSegSAM@e59547c: MSLesSeg P1 (Guarnera et al., Sci Data 2025, CC BY 4.0) and "
                      "3D MR image database of MS patients patient01 (Lesjak et al., Neuroinformatics 2018, CC BY), "
                      "1 mm MNI, skull-stripped, lesions only",
            "validation_only": "Mendeley MS FLAIR slices (Muslim et al., Data in Brief 2022, CC BY 4.0), lesions "
                               "only, caps labelled as lesion",
            "excluded": "a subject whose FLAIR is identical to another subject's and whose masks do not fit it"},
        "software": {"ms3seg_app": __version__, "keras": keras.__version__, "tensorflow": tf.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "license": "MIT (weights trained by the ms3seg-app developers)",
    }


# ------------------------------------------------------------------ data
def load_development_data(root: Path | str) -> tuple[list[LabelledVolume], list]:
    """All labelled volumes and home-scanner 2D slices under the development data folder.

    Returns
    -------
    (volumes, png_slices)
    """
    root = Path(root)
    vols = read_ms3seg_sample(root / "ms3seg_sample") + read_trimask_sample(root / "trimask_sample")
    pngs = read_normal_wmh_png(root / "normal_wmh_png") if (root / "normal_wmh_png").is_dir() else []
    return vols, pngs


def load_external_data(root: Path | str) -> list:
    """Lesion-labelled 2D slices of other sites (``external_2d``; empty if absent).

    Returns
    -------
    list of SourcedSlice (sources ``MSLesSeg``, ``PubMRI``, ``Mendeley``).
    """
    ext = Path(root) / "external_2d"
    out = []
    if (ext / "mssegsam_coco").is_dir():
        out += read_mssegsam_coco(ext / "mssegsam_coco")
    if (ext / "mendeley_jpg").is_dir():
        out += read_mendeley_jpg(ext / "mendeley_jpg")
    return out


def external_set(slices: list, sources, pre: dict) -> SliceSet:
    """The external slices of ``sources`` as a SliceSet (mssegsam is skull-stripped already)."""
    sets = []
    for src in sources:
        ss = [s for s in slices if s.source == src]
        if ss:
            sets.append(png_slices_to_set(ss, pre, skull_stripped=src in ("MSLesSeg", "PubMRI")))
    return SliceSet.concat(sets) if sets else None


def make_folds(subjects: list[str], fully_labelled: list[str], k: int = 3, seed: int = 0) -> list[list[str]]:
    """Subject-level folds; fully labelled subjects spread over different folds."""
    rng = np.random.default_rng(seed)
    rest = [s for s in sorted(subjects) if s not in fully_labelled]
    rest = list(rng.permutation(rest))
    folds: list[list[str]] = [[] for _ in range(k)]
    for i, s in enumerate(sorted(fully_labelled)):
        folds[i % k].append(s)
    for s in rest:
        min(folds, key=len).append(str(s))
    return [sorted(f) for f in folds]


# ------------------------------------------------------------------ training
def _dice_by_class(pred: np.ndarray, truth: np.ndarray, annotated: np.ndarray) -> dict:
    """Pooled Dice per foreground class over a slice set, annotated slices only."""
    out = {}
    for c in (1, 2, 3):
        sel = annotated[:, c] > 0
        if not sel.any():
            continue
        p, t = pred[sel] == c, truth[sel] == c
        denom = p.sum() + t.sum()
        out[c] = float(2 * np.logical_and(p, t).sum() / denom) if denom else 1.0
    return out


def fit(train: SliceSet, val: SliceSet | None, cfg: TrainConfig, log_path: Path | None = None,
        init_model=None):
    """Train one model.

    Parameters
    ----------
    train : SliceSet
    val : SliceSet, optional
        Full-size slices, scored after every epoch (mean Dice of the annotated classes).
        With ``cfg.keep == "best"`` the weights of the best epoch are kept and training
        stops ``cfg.patience`` epochs after it; with ``"last"`` (default, nnU-Net's
        practice) the whole cosine schedule runs and the final weights are kept: one
        validation subject is too noisy a selector (its Dice moves by 0.3 between epochs).
    cfg : TrainConfig
    init_model : keras.Model, optional
        Fine-tune this network: its architecture (depth, width, biases) and weights are
        cloned, instead of a new U-Net of ``cfg.base_filters``.

    Returns
    -------
    (keras.Model, dict history with ``best_epoch`` and per-epoch records)
    """
    import keras

    from ..model.losses import MarginalDiceCE
    from ..model.unet import build_unet

    keras.utils.set_random_seed(cfg.seed)
    if init_model is not None:
        model = keras.models.clone_model(init_model)
        model.set_weights(init_model.get_weights())
    else:
        model = build_unet((None, None, 1), base_filters=cfg.base_filters)
    seq = SliceSequence(train, cfg.batch_size, cfg.crop, cfg.seed, empty_fraction=cfg.empty_fraction,
                        oversample={2: cfg.nwmh_oversample}, external_per_epoch=cfg.external_per_epoch)
    steps = len(seq)
    total = steps * cfg.epochs
    warm = steps * cfg.warmup_epochs
    sched = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.lr / 10, decay_steps=max(1, total - warm), alpha=cfg.min_lr / cfg.lr,
        warmup_target=cfg.lr, warmup_steps=warm)
    model.compile(optimizer=keras.optimizers.AdamW(sched, weight_decay=cfg.weight_decay),
                  loss=MarginalDiceCE(class_weights=None if cfg.nwmh_ce_weight == 1.0 else
                                      [1.0, 1.0, cfg.nwmh_ce_weight, 1.0],
                                      dice_weight=cfg.dice_weight, exclusion_weight=cfg.exclusion_weight))
    history = {"epochs": [], "best_epoch": None, "best_score": -1.0, "steps_per_epoch": steps}
    best_weights = None

    class _Val(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rec = {"epoch": epoch + 1, "loss": float(logs.get("loss", float("nan"))), "time": time.time()}
            if val is not None and len(val):
                prob = self.model.predict(val.images[..., None], batch_size=8, verbose=0)
                dice = _dice_by_class(prob.argmax(-1), val.labels, val.annotated)
                rec["val_dice"] = {CLASSES[c][0]: d for c, d in dice.items()}
                score = float(np.mean(list(dice.values())))
                rec["val_score"] = score
                nonlocal best_weights
                if score > history["best_score"]:
                    history["best_score"], history["best_epoch"] = score, epoch + 1
                    if cfg.keep == "best":
                        best_weights = self.model.get_weights()
                elif cfg.keep == "best" and epoch + 1 - history["best_epoch"] >= cfg.patience:
                    self.model.stop_training = True
            history["epochs"].append(rec)
            LOGGER.info("epoch %d %s", epoch + 1, {k: v for k, v in rec.items() if k != "time"})
            if log_path:
                log_path.write_text(json.dumps(history, indent=1))

    model.fit(seq, epochs=cfg.epochs, verbose=0, callbacks=[_Val()])
    if best_weights is not None:
        model.set_weights(best_weights)
    history["kept_epoch"] = history["best_epoch"] if best_weights is not None else len(history["epochs"])
    return model, history


def save_inference_model(model, path: Path) -> Path:
    """Save weights and architecture only (no optimizer state: a third of the size).

    ``keras.models.clone_model`` of a compiled model comes back compiled, with the
    optimizer (Keras 3.15), so the model is rebuilt from its config instead.
    """
    import keras

    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    clean.save(path)
    return path


def summarise(rows: list[dict], variant: str = "post") -> dict:
    """Mean (and n) of Dice, HD95, AVD and lesion F1 per class over rows.

    ``variant`` selects the card's post-processed masks (``post``) or raw argmax (``raw``).
    """
    rows = [r for r in rows if r.get("variant", "post") == variant]
    out = {}
    for c in (1, 2, 3):
        rs = [r for r in rows if r["class"] == c]
        if not rs:
            continue
        name = CLASSES[c][0]
        out[name] = {"n_subjects": len(rs)}
        for key in ("dice", "precision", "recall", "hd95_mm", "avd", "ltpr", "lfpr", "lesion_f1"):
            vals = [r[key] for r in rs if key in r and r[key] == r[key]]
            if vals:
                out[name][key] = float(np.mean(vals))
    return out


def validation_subjects(train_subjects, fully_labelled, slice_owners) -> list[str]:
    """The inner validation subject of a fold (model selection), as a one-item list.

    The first partially labelled training subject that owns no 2D slices: the fully
    labelled subjects and the owner of the normal-WMH PNG slices are the only sources of
    normal-WMH labels, so they stay in training. Never a test subject (no leakage).
    """
    partial = [s for s in sorted(train_subjects) if s not in fully_labelled]
    return ([s for s in partial if s not in slice_owners] or partial)[:1]


def _slices_for(vols, pngs, subjects, pre) -> SliceSet:
    sets = [volume_to_slices(v, pre) for v in vols if v.subject in subjects]
    ps = [p for p in pngs if p.subject in subjects]
    if ps:
        sets.append(png_slices_to_set(ps, pre))
    return SliceSet.concat(sets)


def evaluate_external(model, card: dict, slices: SliceSet) -> dict:
    """Lesion (abnormal-WMH) agreement on labelled 2D slices of other sites, per source.

    Parameters
    ----------
    model : keras.Model
    card : dict
    slices : SliceSet of lesion-labelled external slices (normalised, model size)

    Returns
    -------
    dict source -> {"n_slices", "dice" (pooled over the source's slices), "precision",
    "recall", "volume_ratio" (predicted / manual lesion area)}.
    """
    from ..model.predict import Predictor

    prob, _ = Predictor.from_model(model, card).predict_slices(slices.images)
    pred = prob.argmax(-1) == LABELS[LESION_CLASS]
    truth = slices.labels == LABELS[LESION_CLASS]
    out = {}
    for src in sorted(set(slices.sources)):
        sel = slices.sources == src
        p, t = pred[sel], truth[sel]
        tp, ps, ts = float(np.logical_and(p, t).sum()), float(p.sum()), float(t.sum())
        out[src] = {"n_slices": int(sel.sum()), "dice": 2 * tp / (ps + ts) if ps + ts else 1.0,
                    "precision": tp / ps if ps else float("nan"), "recall": tp / ts if ts else float("nan"),
                    "volume_ratio": ps / ts if ts else float("nan")}
    return out


def run_cv(data: Path, out: Path, cfg: TrainConfig, k: int = 3, folds_only: list[int] | None = None) -> dict:
    """k-fold subject-level cross-validation with leave-one-source-out on the external slices.

    Fold ``i`` holds out its test subjects and the external source
    ``EXTERNAL_HOLDOUT[i]`` (if any); ``Mendeley`` is never trained on. Each fold's
    model is saved (``fold<i>.keras`` with its card): the folds are the members of the
    shipped ensemble (nnU-Net's recipe), and :func:`run_ensemble` assembles them.
    Writes ``splits.json``, ``fold<i>_history.json``, ``fold<i>.keras`` and its card. The
    folds are scored on their held-out patients and sources by :mod:`.validate` (one
    scoring path for the card).

    Returns
    -------
    list of Path: the fold models written.
    """
    from ..model.card import write_card

    out.mkdir(parents=True, exist_ok=True)
    vols, pngs = load_development_data(data)
    ext = load_external_data(data)
    subjects = [v.subject for v in vols]
    full = [v.subject for v in vols if all(v.annotated)]
    split_file = out / "splits.json"
    if split_file.exists():
        folds = json.loads(split_file.read_text())["folds"]
    else:
        folds = make_folds(subjects, full, k, cfg.seed)
        split_file.write_text(json.dumps({"folds": folds, "external_holdout": EXTERNAL_HOLDOUT,
                                          "validation_only_sources": VALIDATION_ONLY_SOURCES,
                                          "note": "test subjects per fold; normal_wmh_png slices belong to "
                                                  "their subject"}, indent=1))
    card = default_card(cfg)
    pre = card["preprocessing"]
    ext_sources = sorted({s.source for s in ext})
    written = []
    for i, test in enumerate(folds):
        if folds_only and i not in folds_only:
            continue
        held = EXTERNAL_HOLDOUT.get(i)
        train_subj = [s for s in subjects if s not in test]
        val_subj = validation_subjects(train_subj, full, {p.subject for p in pngs})
        fit_subj = [s for s in train_subj if s not in val_subj]
        train_ext = [s for s in ext_sources if s != held and s not in VALIDATION_ONLY_SOURCES]
        LOGGER.info("fold %d: test %s + source %s, val %s, train %s + sources %s", i, test, held, val_subj,
                    fit_subj, train_ext)
        t0 = time.time()
        train_set = _slices_for(vols, pngs, fit_subj, pre)
        ext_train = external_set(ext, train_ext, pre)
        if ext_train is not None:
            train_set = SliceSet.concat([train_set, ext_train])
        model, hist = fit(train_set, _slices_for(vols, [], val_subj, pre), cfg,
                          log_path=out / f"fold{i}_history.json")
        weights = out / f"fold{i}.keras"
        save_inference_model(model, weights)
        fcard = dict(card, name=f"{card['name']}-fold{i}")
        fcard["training"] = dict(card["training"], fold=i, test_subjects=test, validation_subjects=val_subj,
                                 train_subjects=fit_subj, external_sources=train_ext, held_out_source=held)
        write_card(fcard, weights)
        written.append(weights)
        LOGGER.info("fold %d: %s written after %.0f s (kept epoch %d)", i, weights, time.time() - t0,
                    hist["kept_epoch"])
    return written


if __name__ == "__main__":  # python -m ms3seg_app.training.train, as the README runs it
    from .cli import main

    raise SystemExit(main())
