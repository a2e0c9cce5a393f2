"""Shared fixtures. Tests needing the development MRI skip where ../shared/data is absent."""
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "ms3seg_sample").is_dir(),
    reason="development MRI not present (../shared/data is only on the developers' and CI machines)",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ms3seg_sample").is_dir():
        pytest.skip("development MRI not present (../shared/data)")
    return SHARED_DATA


def phantom_labels(shape=(64, 60, 12), seed=0) -> np.ndarray:
    """A label volume with blobs of classes 1-3 (uint8, (X, Y, Z))."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for k in range(shape[2]):
        for c, r in ((1, 8), (2, 5), (3, 4)):
            cx, cy = rng.uniform(15, shape[0] - 15), rng.uniform(15, shape[1] - 15)
            lab[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r, k] = c
    return lab
