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


@pytest.fixture(scope="session")
def mixed_study(tmp_path_factory, shared_data):
    """Participant results of a mixed study, for the real-data and group-level tests.

    BIDS dataset: the bids_example phantoms (sub-01 with two sessions, sub-02), three
    real patients converted to BIDS (sub-104670, sub-112776, sub-105755; manual labels in
    derivatives/manual), sub-dup (a byte-identical copy of sub-02's FLAIR), sub-bad (a
    truncated FLAIR) and sub-missing (in participants.tsv, no data).

    Returns (bids_dir, output_dir, manual_labels_dir).
    """
    import shutil

    from ms3seg_app.cli.run import main
    from ms3seg_app.training.bids_data import write_bids
    from ms3seg_app.training.readers import read_ms3seg_sample, read_trimask_sample

    root = tmp_path_factory.mktemp("study")
    bids = root / "bids"
    shutil.copytree(ROOT / "bids_example", bids)
    vols = [v for v in read_ms3seg_sample(shared_data / "ms3seg_sample") if v.subject in ("104670", "112776")]
    vols += [v for v in read_trimask_sample(shared_data / "trimask_sample") if v.subject == "105755"]
    deriv = write_bids(vols, bids)
    for sub in ("dup", "bad"):
        (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
    src = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    shutil.copy(src, bids / "sub-dup" / "anat" / "sub-dup_FLAIR.nii.gz")
    (bids / "sub-bad" / "anat" / "sub-bad_FLAIR.nii.gz").write_bytes(src.read_bytes()[:5000])
    (bids / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\n"
        "sub-01\t34\tF\tMS\nsub-02\t52\tM\tMS\nsub-dup\t41\tF\tMS\nsub-bad\t29\tM\tMS\n"
        "sub-missing\t63\tF\tMS\nsub-104670\t38\tF\tMS\nsub-112776\t45\tM\tMS\nsub-105755\t57\tF\tMS\n")
    out = root / "out"
    common = ["--skip-bids-validation", "--device", "cpu"]
    rc1 = main([str(bids), str(out), "participant", "--participant-label", "01", "02", "dup", "bad",
                "--skull-strip", "none", *common])
    rc2 = main([str(bids), str(out), "participant", "--participant-label", "104670", "112776", "105755",
                "--skull-strip", "deepbet", "--no-reports", *common])
    assert (rc1, rc2) == (1, 0)
    return bids, out, deriv


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """An untrained width-4 U-Net with a valid card: fast stand-in for pipeline tests."""
    from ms3seg_app.model.card import write_card
    from ms3seg_app.model.unet import build_unet
    from ms3seg_app.training.train import TrainConfig, default_card

    w = tmp_path_factory.mktemp("model") / "tiny.keras"
    build_unet((None, None, 1), base_filters=4).save(w)
    write_card(default_card(TrainConfig(base_filters=4)), w)
    return w


#: Fixtures and modules whose tests run the whole pipeline in subprocesses, train, or read
#: real MRI: marked ``slow`` so that ``pytest -m "not slow"`` gives a quick suite (~2 min).
SLOW_FIXTURES = {"mixed_study", "example_run", "bids_labelled"}
SLOW_MODULES = {"test_interruptions", "test_container", "test_realdata"}
SLOW_TESTS = {"test_console_shows_only_our_lines", "test_failed_flair_is_one_line_with_the_traceback_in_logs",
              "test_derivatives_pass_the_bids_validator", "test_changing_the_model_with_a_shared_work_dir_gives_the_fresh_result",
              "test_few_training_steps_on_real_slices_lower_the_loss", "test_bundled_ensemble_regression_on_bids_example",
              "test_start_up_overlaps_and_an_invalid_dataset_stops_cleanly"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES
                or item.originalname in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
