"""``ms3seg-evaluate``: compare predicted and manual tri-mask dseg volumes.

Pairs are found with pybids in two derivative folders (predicted ``desc-trimask`` and
manual ``desc-manual`` dseg, matched on subject/session/acq/run), or given explicitly
with ``--pair PRED TRUTH``. Writes a TSV (one row per FLAIR and class) and prints a
readable table with the per-class mean. Metrics and their definitions:
:mod:`ms3seg_app.evaluation.metrics` (lesions: 26-connectivity, minimum size given by
``--min-lesion-voxels``, default 3 voxels).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .. import CLASSES
from ..exceptions import InputDataError
from .metrics import evaluate_dseg

ENTS = ("subject", "session", "acquisition", "run")


def find_pairs(pred_dir: Path, truth_dir: Path, pred_desc: str = "trimask", truth_desc: str = "manual"):
    """(key, pred path, truth path, annotated classes) for every matched FLAIR."""
    from bids import BIDSLayout

    lp = BIDSLayout(str(pred_dir), validate=False, is_derivative=True)
    lt = BIDSLayout(str(truth_dir), validate=False, is_derivative=True)
    pairs = []
    for t in lt.get(suffix="dseg", desc=truth_desc, extension=[".nii", ".nii.gz"], return_type="object"):
        ents = {k: v for k, v in t.get_entities().items() if k in ENTS}
        hits = lp.get(suffix="dseg", desc=pred_desc, extension=[".nii", ".nii.gz"], return_type="object", **ents)
        if not hits:
            continue
        ann = t.get_metadata().get("AnnotatedClasses", [0, 1, 2, 3])
        key = "_".join(f"{k}-{ents[k]}" for k in ENTS if ents.get(k))
        pairs.append((key, Path(hits[0].path), Path(t.path), tuple(i in ann for i in range(4))))
    return sorted(pairs)


def evaluate_pairs(pairs) -> pd.DataFrame:
    """Metrics of each (key, pred, truth, annotated) pair; rows per class.

    Lesion-wise metrics use :data:`ms3seg_app.lesion_definition.LESION`.

    Raises
    ------
    InputDataError
        If a prediction and its truth are not on the same voxel grid.
    """
    rows = []
    for key, pp, tp, ann in pairs:
        pi, ti = nib.load(str(pp)), nib.load(str(tp))
        p = np.rint(np.asanyarray(pi.dataobj)).astype(np.int16)
        t = np.rint(np.asanyarray(ti.dataobj)).astype(np.int16)
        if p.shape != t.shape:
            raise InputDataError(f"{pp} {p.shape} and {tp} {t.shape} are not on the same grid")
        spacing = tuple(float(z) for z in nib.affines.voxel_sizes(ti.affine)[:3])  # mm, as the pipeline's
        for r in evaluate_dseg(p, t, spacing, annotated=ann):
            rows.append({"flair": key, "class_name": CLASSES[r["class"]][0], **r})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ms3seg-evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pred_dir", type=Path, nargs="?", help="derivatives with *_desc-trimask_dseg")
    ap.add_argument("truth_dir", type=Path, nargs="?", help="derivatives with *_desc-manual_dseg")
    ap.add_argument("--pair", nargs=2, action="append", metavar=("PRED", "TRUTH"), default=[])
    ap.add_argument("--out", type=Path, default=Path("evaluation.tsv"), help="TSV to write")
    a = ap.parse_args(argv)
    pairs = [(Path(p).name, Path(p), Path(t), (True,) * 4) for p, t in a.pair]
    if a.pred_dir and a.truth_dir:
        pairs += find_pairs(a.pred_dir, a.truth_dir)
    if not pairs:
        ap.error("nothing to compare: give pred_dir and truth_dir with matching dseg files, or --pair")
    try:
        df = evaluate_pairs(pairs)
    except InputDataError as exc:
        print(f"ms3seg-evaluate: {exc}", file=sys.stderr)
        return 1
    df.to_csv(a.out, sep="\t", index=False, float_format="%.5g")
    cols = [c for c in ("dice", "precision", "recall", "hd95_mm", "avd", "ltpr", "lfpr", "lesion_f1") if c in df]
    summary = df.groupby("class_name", sort=False)[cols].mean()
    print(df[["flair", "class_name"] + cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nmean per class:\n" + summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
