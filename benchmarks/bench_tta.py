"""Benchmark: what flip test-time augmentation (TTA) buys, and what it costs (``--no-tta``).

    python benchmarks/bench_tta.py [--data ../shared/data]

Each bundled ensemble member is the model of one fold of the subject-level cross-validation
(the card's ``cross_validation.splits``), so member ``i`` on fold ``i``'s held-out patients
is an honest test. For each, with and without TTA, it prints the mean Dice per class
(ventricles, normal WMH, abnormal WMH; patients where the class is annotated), the lesion-wise
F1, the mean |lesion volume difference|, and the network seconds. The whole ensemble (the
default) is not scored here: every held-out patient was seen by the other members.
Needs ``../shared/data`` (the MS3SEG development volumes).
"""
import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args()
    if not (a.data / "ms3seg_sample").is_dir():
        raise SystemExit(f"{a.data / 'ms3seg_sample'} is absent: this benchmark needs the development data")
    from ms3seg_app.evaluation.metrics import evaluate_dseg
    from ms3seg_app.model.card import load_model
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.training.train import load_development_data

    members, card = load_model()
    splits = card.data["cross_validation"]["splits"]
    vols, _ = load_development_data(a.data)
    rows = {True: [], False: []}
    seconds = {True: 0.0, False: 0.0}
    for i, (member, held_out) in enumerate(zip(members, splits)):
        for tta in (True, False):
            pred = Predictor.from_model(member, card.data, tta=tta)
            for v in (v for v in vols if v.subject in held_out):
                out = pred.predict_image(v.flair)
                seconds[tta] += out.timings["network"]
                spacing = tuple(float(z) for z in v.flair.header.get_zooms()[:3])
                for r in evaluate_dseg(out.dseg, v.labels, spacing, annotated=v.annotated):
                    rows[tta].append({"fold": i, "subject": v.subject, **r})
    names = {1: "ventricles", 2: "normal WMH", 3: "abnormal WMH"}
    print("held-out patients of each fold, its member alone (Dice mean over patients annotated for the class)")
    for tta in (True, False):
        parts = []
        for c, name in names.items():
            rs = [r for r in rows[tta] if r["class"] == c]
            if rs:
                parts.append(f"{name} {np.mean([r['dice'] for r in rs]):.3f} (n={len(rs)})")
        les = [r for r in rows[tta] if r["class"] == 3]
        f1 = np.nanmean([r.get("lesion_f1", np.nan) for r in les]) if les else float("nan")
        dv = np.mean([abs(r["volume_pred_ml"] - r["volume_true_ml"]) for r in les]) if les else float("nan")
        print(f"  TTA {'on ' if tta else 'off'}: Dice " + ", ".join(parts)
              + f"; lesion-wise F1 {f1:.3f}; mean |lesion volume error| {dv:.2f} mL; network {seconds[tta]:.1f} s")
    paired = {}
    for r in rows[True]:
        paired.setdefault((r["subject"], r["class"]), [r["dice"], None])
    for r in rows[False]:
        if (r["subject"], r["class"]) in paired:
            paired[(r["subject"], r["class"])][1] = r["dice"]
    for c, name in names.items():
        d = [on - off for (s, k), (on, off) in paired.items() if k == c and off is not None]
        if d:
            print(f"  Dice(TTA on) - Dice(off), {name}: mean {np.mean(d):+.4f}, per patient "
                  f"{min(d):+.4f} .. {max(d):+.4f}")


if __name__ == "__main__":
    main()
