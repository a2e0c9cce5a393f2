"""Benchmark: training seconds per epoch, inference ms per slice, peak memory.

    python benchmarks/bench_model.py [--data ../shared/data] [--epochs 2]

Training uses the shipped recipe (TrainConfig) on the development data when present,
otherwise on synthetic slices of the same size. Inference times the bundled model on
256x256 slices (with and without left-right test-time augmentation).
"""
import argparse
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    from ms3seg_app.model.predict import Predictor
    from ms3seg_app.training.dataset import SliceSet
    from ms3seg_app.training.train import TrainConfig, _slices_for, default_card, fit, load_development_data

    cfg = TrainConfig(epochs=a.epochs)
    if (a.data / "ms3seg_sample").is_dir():
        vols, pngs = load_development_data(a.data)
        train = _slices_for(vols, pngs, [v.subject for v in vols], default_card(cfg)["preprocessing"])
        src = "development data"
    else:
        rng = np.random.default_rng(0)
        lab = (rng.random((220, 256, 256)) > 0.995).astype(np.uint8) * 3
        train = SliceSet(rng.random((220, 256, 256)).astype(np.float32), lab,
                         np.ones((220, 4), np.float32), np.array(["x"] * 220))
        src = "synthetic slices"
    t0 = time.perf_counter()
    _, hist = fit(train, None, cfg)
    dt = time.perf_counter() - t0
    print(f"training ({src}, {len(train)} slices, width {cfg.base_filters}, crop {cfg.crop}): "
          f"{dt / a.epochs:.1f} s/epoch over {a.epochs} epochs (first epoch includes graph build)")
    pred = Predictor()
    x = np.random.default_rng(1).random((20, 256, 256)).astype(np.float32)
    for tta in (False, True):
        pred.tta = tta
        pred.predict_slices(x[:2])
        t0 = time.perf_counter()
        pred.predict_slices(x)
        print(f"inference tta={tta}: {1000 * (time.perf_counter() - t0) / len(x):.1f} ms/slice")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
