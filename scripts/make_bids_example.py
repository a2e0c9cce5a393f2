"""Generate ``bids_example/``: a tiny synthetic BIDS dataset of FLAIR-like phantoms.

Nothing here comes from real patients. Each phantom is a skull-free ellipsoidal
"brain" (grey-matter rim, white matter), two dark lateral "ventricles", thin bright
periventricular rims (normal-WMH-like caps) and bright deep "lesions", stored like a
clinical 2D FLAIR (LAS, 1.2 x 1.2 x 6.5 mm, 20 slices, int16).

Run: ``python scripts/make_bids_example.py bids_example``  (deterministic output).
"""
import gzip
import io
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (192, 192, 20)
ZOOMS = (1.2, 1.2, 6.5)


def phantom(seed: int, lesions: int, ventricle_scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, ZOOMS)), indexing="ij")
    cx, cy, cz = (np.array(SHAPE) - 1) * np.array(ZOOMS) / 2
    r = ((x - cx) / 70) ** 2 + ((y - cy) / 88) ** 2 + ((z - cz) / 62) ** 2
    img = np.zeros(SHAPE, np.float32)
    img[r < 1] = 520          # grey matter
    img[r < 0.78] = 400       # white matter
    vent = np.zeros(SHAPE, bool)
    for side in (-1, 1):
        rv = ((x - cx - side * 9 * ventricle_scale) / (5 * ventricle_scale)) ** 2 + ((y - cy) / 26) ** 2 + ((z - cz - 5) / 16) ** 2
        vent |= rv < 1
        shell = (rv >= 1) & (rv < 1.5) & (np.abs(y - cy) > 18)  # caps at the horns
        img[shell] = 620
    img[vent] = 90
    for _ in range(lesions):
        while True:
            p = np.array([rng.uniform(-45, 45), rng.uniform(-60, 60), rng.uniform(-30, 35)]) + [cx, cy, cz]
            if ((p[0] - cx) / 70) ** 2 + ((p[1] - cy) / 88) ** 2 + ((p[2] - cz) / 62) ** 2 < 0.5 and abs(p[0] - cx) > 20:
                break
        rad = rng.uniform(2.5, 5)
        img[((x - p[0]) ** 2 + (y - p[1]) ** 2 + ((z - p[2]) / 1.5) ** 2) < rad ** 2] = 760
    img = img + rng.normal(0, 12, SHAPE) * (img > 0)
    return np.clip(np.rint(img), 0, 4000).astype(np.int16)


def save(data: np.ndarray, path: Path) -> None:
    aff = np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2], 1.0])  # LAS, as the clinical FLAIRs
    aff[:3, 3] = [(SHAPE[0] - 1) / 2 * ZOOMS[0], -(SHAPE[1] - 1) / 2 * ZOOMS[1], -(SHAPE[2] - 1) / 2 * ZOOMS[2]]
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, 1)
    img.set_sform(aff, 1)
    raw = io.BytesIO()
    img.to_file_map(img.make_file_map({"image": raw, "header": raw}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(filename="", mode="wb", fileobj=path.open("wb"), mtime=0) as gz:
        gz.write(raw.getvalue())


def main(out: str) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "ms3seg-app synthetic example", "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "License": "CC0", "Authors": ["ms3seg-app developers"],
        "GeneratedBy": [{"Name": "scripts/make_bids_example.py"}]}, indent=2) + "\n")
    (root / "README").write_text("Synthetic FLAIR-like phantoms for testing ms3seg-app. No real data.\n")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tgroup\nsub-01\t34\tF\tMS\nsub-02\t52\tM\tMS\n")
    (root / "participants.json").write_text(json.dumps({"age": {"Description": "age", "Units": "year"},
                                                        "sex": {"Description": "sex"},
                                                        "group": {"Description": "diagnosis group"}}, indent=2) + "\n")
    side = {"MagneticFieldStrength": 1.5, "RepetitionTime": 10.0, "EchoTime": 0.1, "InversionTime": 2.5,
            "MRAcquisitionType": "2D", "SliceThickness": 6.5}
    scans = [("01", "01", 1, 6, 1.0, True), ("01", "02", 2, 8, 1.05, False), ("02", None, 3, 4, 1.3, False)]
    for sub, ses, seed, nles, vscale, t1 in scans:
        d = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        save(phantom(seed, nles, vscale), d / f"{stem}_FLAIR.nii.gz")
        (d / f"{stem}_FLAIR.json").write_text(json.dumps(side, indent=2) + "\n")
        if t1:
            t1d = phantom(seed, 0, vscale).astype(np.float32)
            t1d = np.where(t1d > 0, 900 - t1d * 0.8, 0)  # inverted contrast: dark lesions, bright WM-ish
            save(np.clip(t1d, 0, 4000).astype(np.int16), d / f"{stem}_T1w.nii.gz")
            (d / f"{stem}_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5, "MRAcquisitionType": "2D"}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bids_example")
