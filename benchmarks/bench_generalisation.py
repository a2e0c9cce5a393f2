"""Benchmark: how the bundled model generalises, against the model-v2 targets.

    python benchmarks/bench_generalisation.py                       # figures stored in the card
    python benchmarks/bench_generalisation.py --recompute --cv work/cv_v2 [--data ../shared/data]

Prints subject-level CV per fold and mean, leave-one-source-out lesion Dice and volume
ratio per external source, skull-stripped vs whole-head Dice, pseudo-rescan
repeatability, thin slices vs slabs, and each target with MET / not met. ``--recompute``
re-runs :func:`ms3seg_app.training.validate.validate` on the fold models of a CV folder
(about 4 minutes on 2 cores).
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _ok(cond: bool) -> str:
    return "MET" if cond else "not met"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--cv", type=Path, default=Path("work/cv_v2"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args()
    from ms3seg_app.model.card import load_card
    from ms3seg_app.training.validate import TARGETS

    if a.recompute:
        from ms3seg_app.training.validate import validate

        res = validate(a.data, a.cv)
    else:
        res = load_card().data
    cv, gen, t = res["cross_validation"], res["generalisation"], TARGETS
    print("subject-level CV (Dice per fold; held-out patients):")
    for name, target in t["cv_dice"].items():
        folds = [f["summary"].get(name, {}).get("dice") for f in cv["per_fold"]]
        mean = cv["mean"].get(name, {}).get("dice", float("nan"))
        print(f"  {name:13s} folds {['-' if d is None else round(d, 3) for d in folds]} mean {mean:.3f} "
              f"(target >= {target}: {_ok(mean >= target)})")
    f1 = cv["mean"]["abnormal WMH"].get("lesion_f1", float("nan"))
    print(f"  lesion-wise F1 {f1:.3f} (target >= {t['cv_lesion_f1']}: {_ok(f1 >= t['cv_lesion_f1'])})")
    lo, hi = t["volume_ratio"]
    print("leave-one-source-out (lesion Dice pooled over the source's slices; volume ratio predicted/manual):")
    for src, d in gen["leave_one_source_out"].items():
        print(f"  {src:9s} Dice {d['dice']:.3f} ({_ok(d['dice'] >= t['loso_dice_min'])}), ratio "
              f"{d['volume_ratio']:.2f} ({_ok(lo <= d['volume_ratio'] <= hi)})")
    home = gen["volume_ratio_home_scanner"]["mean"]
    print(f"  home scanner (CV patients) ratio {home:.2f} ({_ok(lo <= home <= hi)})")
    for name, d in gen["skull_stripped_vs_whole_head"].items():
        print(f"skull-stripped vs whole-head, {name}: {d['dice_skull_stripped']:.3f} vs {d['dice_whole_head']:.3f} "
              f"(delta {d['delta']:+.3f}; target within {t['skull_strip_dice_delta_max']}: "
              f"{_ok(abs(d['delta']) <= t['skull_strip_dice_delta_max'])})")
    r, rt = gen["pseudo_rescan"]["mean"], t["rescan"]
    print(f"pseudo-rescan (3 copies per held-out patient): Dice AWMH {r['dice_abnormal_wmh']:.3f}, ventricles "
          f"{r['dice_ventricles']:.3f} (target >= {rt['dice_min']}: "
          f"{_ok(min(r['dice_abnormal_wmh'], r['dice_ventricles']) >= rt['dice_min'])}); lesions appearing or "
          f"vanishing per pair {r['lesions_changed_per_pair']:.1f} ({_ok(r['lesions_changed_per_pair'] <= rt['lesions_changed_per_pair_max'])}); "
          f"lesion volume change {r['lesion_volume_change_pct']:.2f} % ({_ok(r['lesion_volume_change_pct'] <= rt['lesion_volume_change_pct_max'])}); "
          f"ventricle volume change {r['ventricle_volume_change_pct']:.2f} % ({_ok(r['ventricle_volume_change_pct'] <= rt['ventricle_volume_change_pct_max'])})")
    for row in gen["thin_slices_vs_slabs"]["per_source"]:
        print(f"1 mm slices of {row['source']} (fold {row['fold']}): thin {row['dice_thin']:.3f} vs 7-slice slab "
              f"{row['dice_slab']:.3f} ({row['n_slices']} slices)")
    print(json.dumps({"ensemble_on_never_trained_sources": gen["ensemble_on_never_trained_sources"]}, indent=1))


if __name__ == "__main__":
    main()
