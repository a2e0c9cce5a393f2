"""Labelled data as BIDS: convert the development layouts, read them back, train on them.

Layout written by :func:`write_bids` (and read by :func:`read_bids_labelled`)::

    <bids>/sub-<id>/anat/sub-<id>_FLAIR.nii.gz
    <bids>/derivatives/manual/sub-<id>/anat/sub-<id>_space-orig_desc-manual_dseg.nii.gz
    <bids>/derivatives/manual/sub-<id>/anat/sub-<id>_space-orig_desc-manual_dseg.json
        {"AnnotatedClasses": [0, 1, 3], ...}

The manual ``dseg`` is written with the FLAIR's affine (masks aligned to the voxel grid
first), so it overlays the FLAIR in any viewer. ``AnnotatedClasses`` lists the classes
that were labelled; an unannotated class is labelled 0 (background) and trained with
the marginal loss. A user's own annotated BIDS dataset in this form can be used to
retrain or fine-tune (``python -m ms3seg_app.training.train bids``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from ..derivatives import atomic_save_nifti, atomic_write_json, image_like
from ..exceptions import InputDataError
from .dataset import SliceSet, volume_to_slices
from .readers import LabelledVolume
from .train import default_card, fit, save_inference_model

LOGGER = logging.getLogger("ms3seg.training")


def write_bids(volumes: list[LabelledVolume], bids_dir: Path, labels_name: str = "manual") -> Path:
    """Write labelled volumes as BIDS raw + a derivatives folder of manual tri-mask dseg.

    Subject labels are the volume ids with non-alphanumerics removed.

    Returns
    -------
    Path of the derivatives folder.
    """
    bids_dir = Path(bids_dir)
    deriv = bids_dir / "derivatives" / labels_name
    atomic_write_json(bids_dir / "dataset_description.json",
                      {"Name": "ms3seg-app training data", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    atomic_write_json(deriv / "dataset_description.json",
                      {"Name": "manual tri-mask labels", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                       "GeneratedBy": [{"Name": "Manual"}]})
    for v in volumes:
        sub = "".join(ch for ch in v.subject if ch.isalnum())
        anat = bids_dir / f"sub-{sub}" / "anat"
        flair = nib.Nifti1Image(np.asanyarray(v.flair.dataobj), v.flair.affine, v.flair.header)
        atomic_save_nifti(flair, anat / f"sub-{sub}_FLAIR.nii.gz")
        dd = deriv / f"sub-{sub}" / "anat"
        atomic_save_nifti(image_like(v.labels, v.flair, np.uint8), dd / f"sub-{sub}_space-orig_desc-manual_dseg.nii.gz")
        atomic_write_json(dd / f"sub-{sub}_space-orig_desc-manual_dseg.json", {
            "Manual": True, "Sources": [f"bids:raw:sub-{sub}/anat/sub-{sub}_FLAIR.nii.gz"],
            "AnnotatedClasses": [i for i, a in enumerate(v.annotated) if a], "OriginalSource": v.source})
    return deriv


def read_bids_labelled(bids_dir: Path, labels_dir: Path) -> list[LabelledVolume]:
    """Read FLAIRs (pybids) and their manual ``desc-manual_dseg`` from a derivatives folder.

    Raises
    ------
    InputDataError
        If a dseg does not match its FLAIR's grid, holds labels outside 0-3, or none is found.
    """
    from bids import BIDSLayout

    layout = BIDSLayout(str(bids_dir), validate=False)
    labels = BIDSLayout(str(labels_dir), validate=False, is_derivative=True)
    out = []
    for f in layout.get(suffix="FLAIR", extension=[".nii", ".nii.gz"], return_type="object"):
        ents = {k: v for k, v in f.get_entities().items() if k in ("subject", "session", "acquisition", "run")}
        hits = labels.get(suffix="dseg", desc="manual", extension=[".nii", ".nii.gz"], return_type="object", **ents)
        if not hits:
            LOGGER.info("%s: no manual dseg, not used", f.path)
            continue
        flair = nib.load(f.path)
        dimg = nib.load(hits[0].path)
        lab = np.asanyarray(dimg.dataobj)
        if lab.shape != flair.shape or not np.allclose(dimg.affine, flair.affine, atol=1e-3):
            raise InputDataError(f"{hits[0].path}: not on the grid of {f.path} (shape/affine differ)")
        lab = np.rint(lab).astype(np.int16)
        if lab.min() < 0 or lab.max() > 3:
            raise InputDataError(f"{hits[0].path}: labels must be 0-3 (tri-mask)")
        meta = hits[0].get_metadata()
        ann = meta.get("AnnotatedClasses", [0, 1, 2, 3])
        annotated = tuple(i in ann or i == 0 for i in range(4))
        sid = ents["subject"] + (f"_{ents['session']}" if ents.get("session") else "")
        out.append(LabelledVolume(sid, "bids", flair, lab.astype(np.uint8), annotated, Path(f.path)))
    if not out:
        raise InputDataError(f"no FLAIR in {bids_dir} has a *_desc-manual_dseg in {labels_dir}")
    return out


def train_from_bids(bids_dir: Path, labels_dir: Path, out: Path, cfg, init: Path | None = None) -> Path:
    """Train (or fine-tune from ``init``) on a BIDS dataset with manual dseg derivatives.

    One subject is held out for validation-based model selection. Fine-tuning inherits
    the whole initial card (preprocessing, class table, architecture with its depth and
    biases: an MS3SEG ``.h5`` can be fine-tuned) and fine-tunes every member of an
    ensemble.

    Parameters
    ----------
    bids_dir, labels_dir : Path
        Raw dataset and the derivatives with ``*_desc-manual_dseg.nii.gz``.
    out : Path
        Output folder.
    cfg : TrainConfig
    init : Path, optional
        A card or weights file to fine-tune from.

    Returns
    -------
    Path of the written card (``<out>/<name>_model_card.json``).
    """
    import copy

    from ..model.card import card_path_for, load_model, write_card, write_ensemble_card

    vols = read_bids_labelled(bids_dir, labels_dir)
    if init is not None:
        init_models, init_card = load_model(init)
        card = {k: copy.deepcopy(v) for k, v in init_card.data.items()
                if k not in ("sha256", "weights_file", "members", "cross_validation")}
        card["name"] = f"{init_card.name}-finetuned"
        card["training"] = dict(card.get("training", {}), config=default_card(cfg)["training"]["config"])
    else:
        init_models, card = [None], default_card(cfg)
    pre = card["preprocessing"]
    subjects = sorted({v.subject for v in vols})
    val_subj = subjects[:1] if len(subjects) > 2 else []
    train = SliceSet.concat([volume_to_slices(v, pre) for v in vols if v.subject not in val_subj])
    val = SliceSet.concat([volume_to_slices(v, pre) for v in vols if v.subject in val_subj]) if val_subj else None
    out.mkdir(parents=True, exist_ok=True)
    stem = card["name"].replace("-", "_")
    members, best = [], []
    for i, init_model in enumerate(init_models):
        model, hist = fit(train, val, cfg, log_path=None, init_model=init_model)
        suffix = f"_member{i}" if len(init_models) > 1 else ""
        members.append(save_inference_model(model, out / f"{stem}{suffix}.keras"))
        best.append(hist["kept_epoch"])
    card["training"]["data"] = {"bids_dir": str(bids_dir), "subjects": subjects, "validation": val_subj,
                                "fine_tuned_from": str(init) if init else None}
    card["training"]["kept_epoch"] = best
    if len(members) == 1:
        write_card(card, members[0])
        return card_path_for(members[0])
    return write_ensemble_card(card, members, out / f"{stem}_model_card.json")
