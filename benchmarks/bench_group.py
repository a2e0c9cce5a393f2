"""Benchmark: the group level on 1,000 fabricated participants' derivative tables.

Fabricates ``N`` participants (volumes TSV + dseg sidecar each, no images), then runs
the group level (tables, QC flags, statistics, report; the longitudinal registration
is skipped since the fabricated participants have one session) and prints wall time
and peak memory. Target (issue 4): under a minute, memory flat in N.

    python benchmarks/bench_group.py [N ...]     # default: 250 1000
"""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fabricate(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    out = root / "out"
    lines = ["participant_id\tage\tsex\tgroup"]
    header = ("participant_id\tsession_id\tacq\trun\tflair\tventricles_ml\tnormal_wmh_ml\tabnormal_wmh_ml\t"
              "lesion_count\ticv_ml\tventricles_icv_fraction\tnormal_wmh_icv_fraction\tabnormal_wmh_icv_fraction\t"
              "lesion_periventricular_ml\tlesion_periventricular_count\tlesion_periventricular_share\t"
              "lesion_juxtacortical_ml\tlesion_juxtacortical_count\tlesion_juxtacortical_share\tlesion_deep_ml\t"
              "lesion_deep_count\tlesion_deep_share\tqc_warnings\tslice_thickness_mm\tinplane_mm")
    for i in range(n):
        sub = f"{i:05d}"
        d = out / f"sub-{sub}" / "anat"
        d.mkdir(parents=True)
        icv = rng.normal(1450, 120)
        v, nw, aw = rng.gamma(4, 6), rng.gamma(2, 2), rng.gamma(1.5, 4)
        pv, jc = aw * 0.58, aw * 0.18
        row = [f"sub-{sub}", "n/a", "n/a", "n/a", f"sub-{sub}_FLAIR.nii.gz", v, nw, aw, int(rng.integers(0, 40)),
               icv, v / icv, nw / icv, aw / icv, pv, 5, 0.58, jc, 2, 0.18, aw - pv - jc, 3, 0.24, 0, 6.5, 0.9]
        (d / f"sub-{sub}_space-orig_desc-trimask_volumes.tsv").write_text(
            header + "\n" + "\t".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in row) + "\n")
        (d / f"sub-{sub}_space-orig_desc-trimask_dseg.json").write_text(json.dumps(
            {"SourceSHA256": f"{i:064x}", "QCWarnings": []}))
        lines.append(f"sub-{sub}\t{int(rng.integers(18, 80))}\t{'FM'[i % 2]}\t{'MS' if i % 3 else 'control'}")
    (root / "bids").mkdir()
    (root / "bids" / "participants.tsv").write_text("\n".join(lines) + "\n")


def main() -> None:
    from ms3seg_app.group import run_group

    for n in [int(a) for a in sys.argv[1:]] or [250, 1000]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            fabricate(root, n)
            t0 = time.perf_counter()
            run_group(root / "bids", root / "out", longitudinal=False)
            dt = time.perf_counter() - t0
            print(f"group level, {n:5d} participants: {dt:5.1f} s, "
                  f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
