"""Benchmark: wall time and peak memory of the participant level per FLAIR.

Runs ``ms3seg`` on ``bids_example`` (or a BIDS folder given as argument) in a child
process per configuration and prints seconds per FLAIR and the child's peak resident
memory (``ru_maxrss``). Target (issue 3): <= 30 s per 256x256x20 FLAIR including the
report, without FSL, and < 3 GB peak.

    python benchmarks/bench_participant.py [bids_dir] [--skull-strip none|deepbet]
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bids_dir", nargs="?", default=str(ROOT / "bids_example"))
    ap.add_argument("--skull-strip", nargs="+", default=["none", "deepbet"])
    a = ap.parse_args()
    from bids import BIDSLayout

    n = len(BIDSLayout(a.bids_dir, validate=False).get(suffix="FLAIR", extension=[".nii", ".nii.gz"]))
    for method in a.skull_strip:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            r = subprocess.run([sys.executable, "-m", "ms3seg_app", a.bids_dir, out, "participant",
                                "--skull-strip", method, "--skip-bids-validation", "-q"],
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            dt = time.perf_counter() - t0
            peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        print(f"skull-strip={method:8s} FLAIRs={n} rc={r.returncode} total={dt:6.1f} s "
              f"per FLAIR={dt / max(n, 1):5.1f} s (incl. ~model load and report) peak RSS={peak:6.0f} MB")


if __name__ == "__main__":
    main()
