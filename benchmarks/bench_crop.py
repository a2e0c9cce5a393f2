"""Benchmark: inference as a participant run makes it (brain mask, cropped slices), on
patients the network never saw: accuracy and network seconds.

    python benchmarks/bench_crop.py [--crop head|brain] [--data ../shared/data] [--save DIR] [--against DIR]

Each bundled ensemble member is the model of one fold of the subject-level cross-validation
(the card's ``cross_validation.splits``); member ``i`` segments fold ``i``'s held-out
patients with flip TTA inside deepbet's brain mask, as ``ms3seg ... participant`` does,
each slice cropped to its head (the default) or to its brain's box (``--crop brain``),
plus the margin. It prints the mean Dice per class
(patients annotated for the class), the lesion-wise F1, the mean |lesion volume error| and
the network seconds (the first call's graph tracing excluded). ``--save DIR`` keeps each
patient's tri-mask (``.npy``); ``--against DIR`` prints, per class, the Dice between this
run's tri-masks and those saved by another run (e.g. of an earlier commit, run with
``PYTHONPATH`` at its worktree: how much a change of the inference moves the masks).
Needs ``../shared/data`` (the MS3SEG development volumes).
"""
import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

NAMES = {1: "ventricles", 2: "normal WMH", 3: "abnormal WMH"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--crop", choices=["head", "brain"], default="head")
    ap.add_argument("--save", type=Path, help="keep each patient's tri-mask here (.npy)")
    ap.add_argument("--against", type=Path, help="compare with the tri-masks another run saved here")
    a = ap.parse_args()
    if not (a.data / "ms3seg_sample").is_dir():
        raise SystemExit(f"{a.data / 'ms3seg_sample'} is absent: this benchmark needs the development data")
    import ms3seg_app
    from ms3seg_app.brain_extraction import deepbet_mask
    from ms3seg_app.evaluation.metrics import evaluate_dseg
    from ms3seg_app.model.card import load_model
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.training.train import load_development_data

    print(f"ms3seg_app from {Path(ms3seg_app.__file__).parent}")
    members, card = load_model()
    splits = card.data["cross_validation"]["splits"]
    vols, _ = load_development_data(a.data)
    rows, seconds, agree = [], 0.0, {c: [] for c in NAMES}
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
    for i, (member, held_out) in enumerate(zip(members, splits)):
        pred = Predictor.from_model(member, card.data, tta=True, crop=a.crop)
        pred.predict_image(vols[0].flair)  # trace the graph outside the timing
        for v in (v for v in vols if v.subject in held_out):
            out = pred.predict_image(v.flair, deepbet_mask(v.flair))
            seconds += out.timings["network"]
            spacing = tuple(float(z) for z in v.flair.header.get_zooms()[:3])
            for r in evaluate_dseg(out.dseg, v.labels, spacing, annotated=v.annotated):
                rows.append({"fold": i, "subject": v.subject, **r})
            if a.save:
                np.save(a.save / f"{v.subject}.npy", out.dseg)
            if a.against:
                other = np.load(a.against / f"{v.subject}.npy")
                for c in NAMES:
                    p, q = out.dseg == c, other == c
                    if p.any() or q.any():
                        agree[c].append(2.0 * (p & q).sum() / (p.sum() + q.sum()))
    print(f"held-out patients of each fold ({len({r['subject'] for r in rows})}), its member alone, "
          f"TTA, deepbet brain mask, --crop {a.crop} (Dice: mean over patients annotated for the class)")
    parts = []
    for c, name in NAMES.items():
        rs = [r for r in rows if r["class"] == c]
        if rs:
            parts.append(f"{name} {np.mean([r['dice'] for r in rs]):.3f} (n={len(rs)})")
    les = [r for r in rows if r["class"] == 3]
    f1 = np.nanmean([r.get("lesion_f1", np.nan) for r in les]) if les else float("nan")
    dv = np.mean([abs(r["volume_pred_ml"] - r["volume_true_ml"]) for r in les]) if les else float("nan")
    print("  Dice " + ", ".join(parts) + f"; lesion-wise F1 {f1:.3f}; mean |lesion volume error| {dv:.2f} mL; "
          f"network {seconds:.1f} s")
    if a.against:
        for c, name in NAMES.items():
            if agree[c]:
                print(f"  Dice against {a.against}, {name}: mean {np.mean(agree[c]):.4f}, "
                      f"min {np.min(agree[c]):.4f} (n={len(agree[c])})")


if __name__ == "__main__":
    main()
