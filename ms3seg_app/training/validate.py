"""Validation of generalisation for the model card, and assembly of the shipped ensemble.

Run after cross-validation (``train.py cv``), on the saved fold models::

    python -m ms3seg_app.training.train ensemble --data ../shared/data --cv work/cv_v2 --dest ms3seg_app/data

Every figure is computed on data the scoring model never trained on:

subject-level CV
    each fold model on its held-out patients (same 3 folds as before), through the
    inference path (whole volume, the card's post-processing, :data:`LESION`).
leave-one-source-out
    each fold model on the external source it did not train on (``EXTERNAL_HOLDOUT``);
    Mendeley, never trained on, is scored by every fold model and by the ensemble.
skull-stripped vs whole-head
    the CV patients that have an FSL BET ``*_FLAIR_brain`` image, predicted from both by
    their fold model; Dice against the same manual masks.
pseudo-rescan
    each held-out patient's FLAIR in three copies, each with a new smooth bias field,
    gain, Rician-like noise and a small rigid in-plane move (rotation, shift); the fold
    model's tri-masks are moved back and compared between copies: Dice, lesions
    appearing or vanishing per pair, lesion and ventricle volume change.
volume ratio
    predicted / manual lesion volume per source.
"""
from __future__ import annotations

import json
import logging
import time
from itertools import combinations
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .. import CLASSES, LABELS, LESION_CLASS
from ..evaluation.metrics import evaluate_dseg
from ..lesion_definition import LESION
from .dataset import png_slices_to_set
from .train import (EXTERNAL_HOLDOUT, VALIDATION_ONLY_SOURCES, TrainConfig, default_card, evaluate_external,
                    external_set, load_development_data, load_external_data, summarise)

LOGGER = logging.getLogger("ms3seg.training")

#: Targets of the model-v2 issue, stored in the card next to what was reached.
TARGETS = {"cv_dice": {"ventricles": 0.88, "normal WMH": 0.50, "abnormal WMH": 0.70}, "cv_lesion_f1": 0.72,
           "loso_dice_min": 0.60, "volume_ratio": [0.8, 1.25], "skull_strip_dice_delta_max": 0.02,
           "rescan": {"dice_min": 0.95, "lesions_changed_per_pair_max": 0.5, "lesion_volume_change_pct_max": 2.0,
                      "ventricle_volume_change_pct_max": 1.0}}


def _fold_models(cv_dir: Path) -> dict[int, Path]:
    return {int(p.stem[4:]): p for p in sorted(Path(cv_dir).glob("fold[0-9].keras"))}


def _predictor(weights: Path):
    from ..model.predict import Predictor

    return Predictor.load(weights)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = float(a.sum() + b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / s if s else 1.0


def _rigid_move(data: np.ndarray, angle_deg: float, shift_vox, order: int, inverse: bool = False) -> np.ndarray:
    """Rotate each axial (I, J) slice about the centre and shift (voxels), on the same grid;
    ``inverse`` undoes the move (forward: out(x) = in(R x + o); inverse: in(y) = out(R^T (y - o)))."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    centre = (np.array(data.shape) - 1) / 2.0
    offset = centre - rot @ centre - np.array([shift_vox[0], shift_vox[1], 0.0])
    if inverse:
        rot, offset = rot.T, -rot.T @ offset
    return ndimage.affine_transform(data, rot, offset=offset, order=order, mode="constant", cval=0)


def pseudo_rescan(img: nib.Nifti1Image, rng: np.random.Generator) -> tuple[nib.Nifti1Image, dict]:
    """One simulated rescan of a FLAIR on its own grid.

    A smooth multiplicative bias field (+-10 %), a gain of 0.9-1.1, Rician-like noise
    (2 % of the tissue intensity), and an in-plane rigid move (rotation +-2 deg,
    shift +-1.5 voxels).

    Returns
    -------
    (image, move) : Nifti1Image (same grid, float32) and the move ``{"angle", "shift"}``
    """
    data = np.asarray(img.dataobj, np.float32)
    move = {"angle": float(rng.uniform(-2, 2)), "shift": [float(s) for s in rng.uniform(-1.5, 1.5, 2)]}
    moved = _rigid_move(data, move["angle"], move["shift"], order=1)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij")
    coef = rng.uniform(-0.1, 0.1, 3)
    bias = np.exp(sum(c * g for c, g in zip(coef, grids)))
    scale = float(np.percentile(data[data > 0], 50)) if (data > 0).any() else 1.0
    sigma = 0.02 * scale
    noisy = np.sqrt((moved * bias * rng.uniform(0.9, 1.1) + rng.normal(0, sigma, data.shape)) ** 2
                    + rng.normal(0, sigma, data.shape) ** 2)
    return nib.Nifti1Image(noisy.astype(np.float32), img.affine, img.header), move


def _lesion_changes(a: np.ndarray, b: np.ndarray, voxel_mm3: float) -> int:
    """Lesions of ``a`` that touch none of ``b`` plus lesions of ``b`` that touch none of ``a``."""
    la, na = LESION.label(a, voxel_mm3)
    lb, nb = LESION.label(b, voxel_mm3)
    hit_a = len(np.setdiff1d(np.unique(la[lb > 0]), [0]))
    hit_b = len(np.setdiff1d(np.unique(lb[la > 0]), [0]))
    return (na - hit_a) + (nb - hit_b)


def rescan_repeatability(pred, img: nib.Nifti1Image, copies: int = 3, seed: int = 0) -> dict:
    """Repeatability of one model on ``copies`` pseudo-rescans of one FLAIR.

    Returns
    -------
    dict: ``dice_abnormal_wmh`` and ``dice_ventricles`` (mean over pairs),
    ``lesions_changed_per_pair``, ``lesion_volume_change_pct`` and
    ``ventricle_volume_change_pct`` (mean absolute pairwise difference / mean volume, %).
    """
    rng = np.random.default_rng(seed)
    vox = float(abs(np.linalg.det(img.affine[:3, :3])))
    segs = []
    for _ in range(copies):
        scan, move = pseudo_rescan(img, rng)
        d = pred.predict_image(scan).dseg
        segs.append(_rigid_move(d, move["angle"], move["shift"], order=0, inverse=True))
    awmh, ven = pred.card.lesion_class, pred.card.class_index("VEN")
    out = {"dice_abnormal_wmh": [], "dice_ventricles": [], "lesions_changed_per_pair": [],
           "lesion_volume_change_pct": [], "ventricle_volume_change_pct": []}
    for a, b in combinations(segs, 2):
        out["dice_abnormal_wmh"].append(_dice(a == awmh, b == awmh))
        out["dice_ventricles"].append(_dice(a == ven, b == ven))
        out["lesions_changed_per_pair"].append(_lesion_changes(a == awmh, b == awmh, vox))
        for key, c in (("lesion_volume_change_pct", awmh), ("ventricle_volume_change_pct", ven)):
            va, vb = float((a == c).sum()), float((b == c).sum())
            out[key].append(100.0 * abs(va - vb) / max(0.5 * (va + vb), 1.0))
    return {k: float(np.mean(v)) for k, v in out.items()}


def thin_vs_slab(models, card: dict, slices: list, half: int = 3) -> dict:
    """How to feed 1 mm slices to a model trained on ~6.5 mm slices: as they are, or as slabs.

    For every slice of a 1 mm source whose ``half`` neighbours on both sides are present
    (the mssegsam slices are numbered ``..._slice<k>``), the lesion Dice (pooled) of the
    thin slice is compared with that of the mean of the ``2 * half + 1`` slices (a slab
    of the training thickness), both against the centre slice's manual mask.

    Returns
    -------
    dict source -> {"n_slices", "dice_thin", "dice_slab", "volume_ratio_thin", "volume_ratio_slab"}
    """
    import re
    from dataclasses import replace

    out = {}
    for src in sorted({s.source for s in slices}):
        by_k = {}
        for s in slices:
            m = re.search(r"_slice(\d+)$", s.name)
            if s.source == src and m:
                by_k[int(m.group(1))] = s
        centre = [k for k in sorted(by_k) if all(k + d in by_k for d in range(-half, half + 1))]
        if not centre:
            continue
        thin = [by_k[k] for k in centre]
        slab = [replace(by_k[k], image=np.mean([by_k[k + d].image for d in range(-half, half + 1)], axis=0))
                for k in centre]
        pre = card["preprocessing"]
        r_thin = evaluate_external(models, card, png_slices_to_set(thin, pre, skull_stripped=True))[src]
        r_slab = evaluate_external(models, card, png_slices_to_set(slab, pre, skull_stripped=True))[src]
        out[src] = {"n_slices": len(centre), "dice_thin": r_thin["dice"], "dice_slab": r_slab["dice"],
                    "volume_ratio_thin": r_thin["volume_ratio"], "volume_ratio_slab": r_slab["volume_ratio"]}
    return out


def validate(data: Path, cv_dir: Path) -> dict:
    """All generalisation figures of the fold models in ``cv_dir`` (see the module docstring).

    Returns
    -------
    dict with ``cross_validation`` (the card block) and ``generalisation``.
    """
    t0 = time.time()
    folds = json.loads((Path(cv_dir) / "splits.json").read_text())["folds"]
    models = _fold_models(cv_dir)
    vols, _ = load_development_data(data)
    ext = load_external_data(data)
    pre = default_card(TrainConfig())["preprocessing"]
    rows, per_fold, loso, strip_rows, rescan_rows, ratio_home, slab_rows = [], [], {}, [], [], [], []
    loaded = {}
    for i, weights in sorted(models.items()):
        pred = loaded[i] = _predictor(weights)
        test = [v for v in vols if v.subject in folds[i]]
        frows = []
        for v in test:
            out = pred.predict_image(v.flair)
            spacing = tuple(float(z) for z in nib.affines.voxel_sizes(v.flair.affine)[:3])  # mm
            for variant, dseg in (("post", out.dseg),
                                  ("raw", np.argmax(out.probabilities, axis=-1).astype(np.uint8))):
                for r in evaluate_dseg(dseg, v.labels, spacing, annotated=v.annotated):
                    frows.append({"fold": i, "subject": v.subject, "class_name": CLASSES[r["class"]][0],
                                  "variant": variant, **r})
            les = [r for r in frows if r["subject"] == v.subject and r["class"] == LABELS[LESION_CLASS] and r["variant"] == "post"]
            if les and les[0]["volume_true_ml"] > 0:
                ratio_home.append(les[0]["volume_pred_ml"] / les[0]["volume_true_ml"])
            brain_p = v.extra.get("brain_mask")
            if brain_p:
                stripped = Path(str(brain_p).replace("_brain_mask.nii.gz", "_FLAIR_brain.nii.gz"))
                if stripped.is_file():
                    s_img = nib.load(str(stripped))
                    s_out = pred.predict_image(nib.Nifti1Image(np.asarray(s_img.dataobj, np.float32), v.flair.affine,
                                                               v.flair.header))
                    for c in (1, 3):
                        strip_rows.append({"subject": v.subject, "class": c,
                                           "whole_head": _dice(out.dseg == c, v.labels == c),
                                           "skull_stripped": _dice(s_out.dseg == c, v.labels == c)})
            rescan_rows.append({"subject": v.subject, **rescan_repeatability(pred, v.flair, seed=len(rescan_rows))})
            LOGGER.info("validated %s (fold %d)", v.subject, i)
        rows += frows
        per_fold.append({"fold": i, "test": folds[i], "summary": summarise(frows)})
        held = EXTERNAL_HOLDOUT.get(i)
        if held:
            for src, res in thin_vs_slab(pred.models, pred.card.data, [s for s in ext if s.source == held]).items():
                slab_rows.append({"fold": i, "source": src, **res})
        unseen = [s for s in {s.source for s in ext}
                  if s == EXTERNAL_HOLDOUT.get(i) or s in VALIDATION_ONLY_SOURCES]
        if unseen:
            for src, res in evaluate_external(pred.models[0] if len(pred.models) == 1 else pred.models,
                                              pred.card.data, external_set(ext, sorted(unseen), pre)).items():
                loso.setdefault(src, []).append({"fold": i, **res})
    # the ensemble on the never-trained source
    from ..model.predict import Predictor

    members = [m for p in loaded.values() for m in p.models]
    ens = Predictor.from_model(members, next(iter(loaded.values())).card.data)
    never = external_set(ext, list(VALIDATION_ONLY_SOURCES), pre)
    ens_ext = evaluate_external(members, ens.card.data, never) if never is not None else {}
    strip = {}
    for c, name in ((1, "ventricles"), (3, "abnormal WMH")):
        rs = [r for r in strip_rows if r["class"] == c]
        if rs:
            wh, ss = float(np.mean([r["whole_head"] for r in rs])), float(np.mean([r["skull_stripped"] for r in rs]))
            strip[name] = {"n_subjects": len(rs), "dice_whole_head": wh, "dice_skull_stripped": ss,
                           "delta": ss - wh}
    rescan = ({k: float(np.mean([r[k] for r in rescan_rows])) for k in rescan_rows[0] if k != "subject"}
              if rescan_rows else {})
    cv = {
        "scheme": f"{len(folds)}-fold subject-level cross-validation (final weights of each fold's full "
                  "schedule; an inner validation subject is scored per epoch for the record); fold i also "
                  "holds out one external source",
        "splits": folds, "lesion_definition": LESION.to_dict(),
        "per_fold": per_fold,
        "per_subject": [{k: r[k] for k in ("fold", "subject", "class_name", "dice", "hd95_mm", "avd", "lesion_f1",
                                           "volume_pred_ml", "volume_true_ml") if k in r}
                        for r in rows if r["variant"] == "post"],
        "mean": summarise(rows), "mean_raw_argmax": summarise(rows, "raw"),
    }
    gen = {
        "leave_one_source_out": {src: {"per_fold": rs, "dice": float(np.mean([r["dice"] for r in rs])),
                                       "volume_ratio": float(np.mean([r["volume_ratio"] for r in rs]))}
                                 for src, rs in sorted(loso.items())},
        "ensemble_on_never_trained_sources": ens_ext,
        "volume_ratio_home_scanner": {"mean": float(np.mean(ratio_home)) if ratio_home else None,
                                      "per_subject": ratio_home},
        "skull_stripped_vs_whole_head": strip,
        "pseudo_rescan": {"copies": 3, "per_subject": rescan_rows, "mean": rescan},
        "thin_slices_vs_slabs": {"per_source": slab_rows,
                                 "description": "held-out 1 mm sources: lesion Dice of each slice as it is vs "
                                                "the mean of 7 adjacent 1 mm slices (a slab of the training "
                                                "thickness), scored on the centre slice's mask"},
        "targets": TARGETS, "seconds": time.time() - t0,
        "notes": "External sources are 2D slices (lesion labels only): Dice pooled over a source's slices, "
                 "volume ratio = predicted / manual lesion area. Mendeley slices are resampled from an "
                 "assumed 0.47 mm pixel; some are coronal. Skull-stripped inputs are the development data's "
                 "FSL BET images of the CV patients.",
    }
    return {"cross_validation": cv, "generalisation": gen}


def assemble_ensemble(data: Path, cv_dir: Path, dest: Path) -> Path:
    """Validate the fold models and write them with an ensemble card into ``dest``.

    Returns
    -------
    Path of the ensemble card.
    """
    import shutil

    from ..model.card import CARD_SUFFIX, write_ensemble_card

    models = _fold_models(cv_dir)
    hist = {i: json.loads((Path(cv_dir) / f"fold{i}_history.json").read_text()) for i in models}
    res = validate(data, cv_dir)
    cfg_card = json.loads((Path(cv_dir) / f"fold{min(models)}_model_card.json").read_text())
    card = default_card(TrainConfig(**cfg_card["training"]["config"]))
    card["name"] = card["name"] + "-ensemble"
    card["ensemble"] = {"members": len(models), "combination": "mean of softmax probabilities, each member "
                        "averaged with its left-right flipped prediction (nnU-Net-style CV ensemble)",
                        "uncertainty": "per voxel: standard deviation of the members' abnormal-WMH probability; "
                                       "per lesion (lesion table 'uncertainty'): twice its mean over the lesion, "
                                       "0 = members agree, 1 = maximal disagreement"}
    card["training"]["folds"] = [{"fold": i, "kept_epoch": hist[i].get("kept_epoch", hist[i]["best_epoch"]),
                                  "best_validation_epoch": hist[i]["best_epoch"],
                                  "epochs_run": len(hist[i]["epochs"]),
                                  "seconds": hist[i]["epochs"][-1]["time"] - hist[i]["epochs"][0]["time"]}
                                 for i in sorted(models)]
    card.update(res)
    dest.mkdir(parents=True, exist_ok=True)
    stem = card["name"].replace("-", "_")
    members = []
    for i, w in sorted(models.items()):
        target = dest / f"{stem}_fold{i}.keras"
        shutil.copyfile(w, target)
        members.append(target)
    for old in dest.glob(f"*{CARD_SUFFIX}"):
        if old.name != f"{stem}{CARD_SUFFIX}":
            LOGGER.info("removing the previous bundled card %s", old.name)
            old.unlink()
    return write_ensemble_card(card, members, dest / f"{stem}{CARD_SUFFIX}")
