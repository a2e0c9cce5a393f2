"""Write tests/data/reference_volumes.tsv: the bundled model's volumes on bids_example.

Run after changing the bundled model (the regression test refuses a reference made by
another model):

    python scripts/make_reference_volumes.py
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from ms3seg_app.model.card import load_card

    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "ms3seg_app", str(ROOT / "bids_example"), out, "participant",
                        "--skull-strip", "none", "--device", "cpu", "--no-reports", "-q"], check=True)
        rows = []
        for f in sorted(Path(out).rglob("*_space-orig_desc-trimask_volumes.tsv")):
            r = pd.read_csv(f, sep="\t").iloc[0]
            rows.append({"prefix": f.name.replace("_space-orig_desc-trimask_volumes.tsv", ""),
                         **{c: r[c] for c in ("ventricles_ml", "normal_wmh_ml", "abnormal_wmh_ml", "icv_ml",
                                              "lesion_count")},
                         "model_sha256": load_card().sha256})
    dest = ROOT / "tests" / "data" / "reference_volumes.tsv"
    pd.DataFrame(rows).to_csv(dest, sep="\t", index=False, float_format="%.4f")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
