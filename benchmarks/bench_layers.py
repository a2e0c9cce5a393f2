"""Benchmark: how fast this CPU runs the U-Net's convolutions (GFLOP/s per layer shape).

    python benchmarks/bench_layers.py [--batch 16] [--height 208] [--width 240]

Each 3x3 "same" convolution of the base-16 U-Net at its level's resolution (a brain-box crop
of a clinical slice by default), as a fused ``conv2d + relu`` ``tf.function``; prints
milliseconds per batch and GFLOP/s (2 x 9 x C_in x C_out multiply-adds per output pixel).
What the network's speed is bounded by: when the large layers already run near the CPU's
throughput, only fewer or smaller networks make inference faster (issue 14).
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--height", type=int, default=208)
    ap.add_argument("--width", type=int, default=240)
    ap.add_argument("--base", type=int, default=16)
    a = ap.parse_args()
    import tensorflow as tf

    rng = np.random.default_rng(0)
    # (in, out, level) of the encoder's two convolutions per level; level 4 is the bottleneck
    shapes = [(1, a.base, 0), (a.base, a.base, 0)]
    shapes += [(c // 2, c, lv) for lv in range(1, 5) for c in [a.base * 2 ** lv]]
    shapes += [(c, c, lv) for lv in range(1, 5) for c in [a.base * 2 ** lv]]
    shapes.sort(key=lambda s: s[2])
    print(f"batch {a.batch}, {a.height}x{a.width} at level 0; {os.cpu_count()} CPU(s)")
    for cin, cout, level in shapes:
        h, w = a.height // 2 ** level, a.width // 2 ** level
        x = tf.constant(rng.random((a.batch, h, w, cin), np.float32))
        k = tf.constant(rng.standard_normal((3, 3, cin, cout)).astype(np.float32))
        f = tf.function(lambda t, k=k: tf.nn.relu(tf.nn.conv2d(t, k, 1, "SAME")))
        f(x)
        t0 = time.perf_counter()
        for _ in range(5):
            f(x).numpy()
        dt = (time.perf_counter() - t0) / 5
        flops = 2 * 9 * cin * cout * a.batch * h * w
        print(f"  level {level} {cin:4d} -> {cout:4d} channels, {h}x{w}: {dt * 1e3:7.1f} ms, "
              f"{flops / dt / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
