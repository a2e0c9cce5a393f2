"""Issue 13 (reliability round 2) and issue 12 (terminal, derivatives validity)."""
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT

EXAMPLE = ROOT / "bids_example"
SECRET = "PatientName=Doe^Jane DOB=19700101"


def _run(argv):
    from ms3seg_app.cli.run import main

    return main([str(a) for a in argv])


def _one_subject(tmp_path, sub="02"):
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    return bids, bids / f"sub-{sub}" / "anat" / f"sub-{sub}_FLAIR.nii.gz"


def test_no_free_text_or_extensions_from_input_headers(tmp_path, tiny_model):
    bids, flair = _one_subject(tmp_path)
    img = nib.load(flair)
    hdr = img.header.copy()
    hdr["descrip"] = SECRET.encode()
    hdr["aux_file"] = b"Doe^Jane"
    hdr["intent_name"] = b"DOB1970"
    hdr.extensions.append(nib.nifti1.Nifti1Extension(6, SECRET.encode()))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, hdr), flair)
    t1 = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    shutil.copy(bids / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz", t1)
    t1img = nib.load(t1)
    nib.save(nib.Nifti1Image(np.asanyarray(t1img.dataobj), t1img.affine, hdr), t1)
    out = tmp_path / "out"
    assert _run([bids, out, "participant", "--participant-label", "02", "--skull-strip", "none",
                 "--skip-bids-validation", "--device", "cpu", "--no-reports", "--model", tiny_model]) == 0
    images = sorted((out / "sub-02").rglob("*.nii.gz"))
    assert len(images) >= 6  # dseg, mask, 3 probsegs, coregistered T1w
    for p in images:
        raw = p.read_bytes()
        import gzip

        body = gzip.decompress(raw)
        assert b"Doe^Jane" not in body and b"DOB=19700101" not in body and b"DOB1970" not in body, p.name
        o = nib.load(p)
        assert len(o.header.extensions) == 0
        np.testing.assert_allclose(o.affine, img.affine, atol=1e-5)


def test_qform_only_input_keeps_its_codes(tmp_path, tiny_model):
    bids, flair = _one_subject(tmp_path)
    img = nib.load(flair)
    q = nib.Nifti1Image(np.asanyarray(img.dataobj), None)
    q.set_qform(img.affine, code=1)
    q.set_sform(None, code=0)
    nib.save(q, flair)
    out = tmp_path / "out"
    assert _run([bids, out, "participant", "--participant-label", "02", "--skull-strip", "none",
                 "--skip-bids-validation", "--device", "cpu", "--no-reports", "--model", tiny_model]) == 0
    d = nib.load(out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.nii.gz")
    assert (int(d.header["qform_code"]), int(d.header["sform_code"])) == (1, 0)
    np.testing.assert_allclose(d.affine, img.affine, atol=1e-4)


def test_two_slice_flair_is_processed_with_a_coverage_warning(tmp_path, tiny_model):
    bids, flair = _one_subject(tmp_path)
    img = nib.load(flair)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 9:11], img.affine, img.header), flair)
    out = tmp_path / "out"
    assert _run([bids, out, "participant", "--participant-label", "02", "--skull-strip", "none",
                 "--skip-bids-validation", "--device", "cpu", "--no-reports", "--model", tiny_model]) == 0
    side = json.loads((out / "sub-02" / "anat" / "sub-02_space-orig_desc-trimask_dseg.json").read_text())
    assert any("covers only" in w for w in side["QCWarnings"])


def test_probsegs_are_compact_and_round_trip_within_1_255(tmp_path):
    from ms3seg_app.derivatives import atomic_save_nifti, probability_image

    rng = np.random.default_rng(0)
    p = rng.random((64, 64, 20)).astype(np.float32)
    p[:10] = 0.0
    ref = nib.Nifti1Image(np.zeros((64, 64, 20), np.float32), np.diag([0.9, 0.9, 6.5, 1.0]))
    path = tmp_path / "p.nii.gz"
    atomic_save_nifti(probability_image(p, ref), path)
    back = nib.load(path)
    assert back.get_data_dtype() == np.uint8
    got = np.asarray(back.dataobj, np.float64)
    assert np.abs(got - p).max() <= 0.5 / 255 + 1e-6
    assert np.all(got[:10] == 0.0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_probability_maps_are_quantised_in_chunks_as_a_whole_volume_would_be(dtype):
    """probability_image works PROBABILITY_CHUNK_SLICES slices at a time (memory): the same
    uint8 values as the whole-volume formula, across chunk boundaries."""
    from ms3seg_app.derivatives import PROBABILITY_CHUNK_SLICES, probability_image

    rng = np.random.default_rng(1)
    p = (rng.random((20, 24, 2 * PROBABILITY_CHUNK_SLICES + 5)) * 1.2 - 0.1).astype(dtype)  # some outside [0, 1]
    ref = nib.Nifti1Image(np.zeros(p.shape, np.float32), np.eye(4))
    want = np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
    img = probability_image(p, ref)  # in memory: dataobj is the stored uint8 array
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), want)


def test_probability_map_of_a_box_is_the_whole_grid_map_with_its_value_outside():
    """A class's probabilities held for the brain's box only give the map of the whole-grid
    array that has the class's outside value (0, or 1 for the background) outside the box;
    a box the array does not fill is an error."""
    from ms3seg_app.derivatives import probability_image

    rng = np.random.default_rng(5)
    ref = nib.Nifti1Image(np.zeros((30, 26, 40), np.float32), np.eye(4))
    box = (slice(4, 21), slice(0, 26), slice(7, 38))
    inner = rng.random((17, 26, 31)).astype(np.float16)
    whole = np.zeros(ref.shape, np.float16)
    whole[box] = inner
    np.testing.assert_array_equal(np.asarray(probability_image(inner, ref, box).dataobj),
                                  np.asarray(probability_image(whole, ref).dataobj))
    # the background's map is 1 outside the box (Prediction.outside)
    whole[...] = 1.0
    whole[box] = inner
    np.testing.assert_array_equal(np.asarray(probability_image(inner, ref, box, outside=1.0).dataobj),
                                  np.asarray(probability_image(whole, ref).dataobj))
    with pytest.raises(ValueError, match="do not fill the box"):
        probability_image(inner[1:], ref, box)
    with pytest.raises(ValueError, match="give the box they cover"):
        probability_image(inner, ref)  # a box's array without its box: refused, not misplaced


def test_saved_nifti_is_the_gzip_of_the_uncompressed_file_and_reproducible(tmp_path):
    """atomic_save_nifti streams nibabel's output into gzip (no uncompressed copy in memory):
    the file is the gzip (no timestamp) of the uncompressed one, byte for byte, every time."""
    import gzip

    from ms3seg_app.derivatives import atomic_save_nifti, image_like

    rng = np.random.default_rng(2)
    ref = nib.Nifti1Image(np.zeros((40, 30, 12), np.float32), np.diag([0.9, 0.9, 3.0, 1.0]))
    img = image_like((rng.random((40, 30, 12)) > 0.6).astype(np.uint8), ref, np.uint8)
    plain, packed = atomic_save_nifti(img, tmp_path / "a.nii"), atomic_save_nifti(img, tmp_path / "a.nii.gz")
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    # the bytes of compressing the whole uncompressed file in one write (the previous way)
    import io

    whole = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=whole, mtime=0, compresslevel=6) as gz:
        gz.write(plain.read_bytes())
    assert packed.read_bytes() == whole.getvalue()
    assert atomic_save_nifti(img, tmp_path / "b.nii.gz").read_bytes() == packed.read_bytes()
    np.testing.assert_array_equal(np.asarray(nib.load(packed).dataobj), np.asarray(img.dataobj))


def test_derivatives_pass_the_bids_validator(tmp_path, tiny_model):
    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator-deno",
                                                                  path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("bids-validator-deno is not installed")
    out = tmp_path / "out"
    assert _run([EXAMPLE, out, "participant", "--skull-strip", "none", "--skip-bids-validation", "--device", "cpu",
                 "--model", tiny_model]) == 0
    assert _run([EXAMPLE, out, "group"]) == 0
    env = dict(os.environ, DENO_NO_UPDATE_CHECK="1")
    res = subprocess.run([exe, str(out), "--json"], capture_output=True, text=True, timeout=300, env=env)
    report = json.loads(res.stdout)
    errors = [i for i in report["issues"]["issues"] if i.get("severity") == "error"]
    assert errors == [], errors[:5]


NOISE = ("tensorflow", "absl", "cuda", "cuInit", "oneDNN", "E0000", "I0000", "W0000", "WARNING: All log messages")


def test_console_shows_only_our_lines(tmp_path, tiny_model):
    """Subprocess run at the default verbosity: no TensorFlow/absl/CUDA lines, one line per FLAIR."""
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "ms3seg_app", str(EXAMPLE), str(out), "participant", "--skull-strip", "none",
           "--skip-bids-validation", "--model", str(tiny_model)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    for word in NOISE:
        assert word.lower() not in text.lower(), (word, text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for prefix in ("sub-01_ses-01", "sub-01_ses-02", "sub-02"):
        assert any(ln.startswith(f"{prefix}: ") and "lesion" in ln and "mL" in ln for ln in lines), text
    assert any("3 succeeded, 0 failed" in ln for ln in lines)
    assert any("next: ms3seg" in ln and "group" in ln for ln in lines)
    # the native noise went to the log folder instead
    assert list((out / "logs").glob("native_*.log"))
    # a complete rerun says so per FLAIR and never imports TensorFlow
    res2 = subprocess.run(cmd + ["-v"], capture_output=True, text=True, timeout=300, env=env)
    assert res2.returncode == 0
    assert (res2.stdout + res2.stderr).count("skipped (outputs complete)") == 3
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from ms3seg_app.cli.run import main; "
        f"rc = main({[str(EXAMPLE), str(out), 'participant', '--skip-bids-validation', '--skull-strip', 'none', '--model', str(tiny_model)]!r}); "
        "print('TF', 'tensorflow' in sys.modules, 'keras' in sys.modules); sys.exit(rc)")],
        capture_output=True, text=True, timeout=300, env=env)
    assert probe.returncode == 0 and "TF False False" in probe.stdout, probe.stdout + probe.stderr
    group = subprocess.run([sys.executable, "-m", "ms3seg_app", str(EXAMPLE), str(out), "group"],
                           capture_output=True, text=True, timeout=300, env=env)
    gtext = group.stdout + group.stderr
    assert group.returncode == 0, gtext
    assert "group: read 3 FLAIR result(s) of 2 participant(s)" in gtext and "group.html" in gtext


def test_failed_flair_is_one_line_with_the_traceback_in_logs(tmp_path, tiny_model):
    bids, flair = _one_subject(tmp_path)
    flair.write_bytes(flair.read_bytes()[:3000])  # truncated
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ms3seg_app", str(bids), str(out), "participant", "--skull-strip", "none",
           "--skip-bids-validation", "--device", "cpu", "--no-reports", "--model", str(tiny_model)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 1
    assert "Traceback" not in text
    failed = [ln for ln in text.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "sub-02_FLAIR.nii.gz" in failed[0] and "re-export" in failed[0]
    assert any(ln.startswith("sub-01_ses-01: ") for ln in text.splitlines())   # the others were processed
    crash = list((out / "logs").glob("crash-sub-02-*.txt"))
    assert crash and "Traceback" in crash[0].read_text()
    assert not (out / "sub-02").exists() or not list((out / "sub-02").rglob("*.nii.gz"))


def test_start_up_overlaps_and_an_invalid_dataset_stops_cleanly(tmp_path, tiny_model, monkeypatch):
    """TensorFlow is imported in a thread while the validator runs, the networks load in
    another while the first FLAIR is checked, sliced and brain-extracted (its inference waits
    for them); an invalid dataset still stops the run (exit 1, one line, nothing processed)
    after the first thread is joined, and the networks are never loaded."""
    import threading

    from ms3seg_app.cli import run

    monkeypatch.setattr(run, "_WORKER", {})  # no network loaded by an earlier test of this process

    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator-deno",
                                                                  path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("bids-validator-deno is not installed")
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    out = tmp_path / "out"
    args = ["participant", "--participant-label", "02", "--skull-strip", "none", "--device", "cpu",
            "--no-reports", "--model", tiny_model]
    assert _run([bids, out, *args]) == 0
    log = next((out / "logs").glob("ms3seg_participant_*.log")).read_text()
    startup = json.loads(log.split("STARTUP_SECONDS", 1)[1].splitlines()[0])
    assert {"validation", "tensorflow_import", "waiting_for_tensorflow", "model_check"} <= set(startup)
    assert "MODEL_LOAD_SECONDS" in log
    assert "inference.waiting_for_model" in json.loads(log.split("STAGE_SECONDS", 1)[1].splitlines()[0])

    shutil.rmtree(out)
    (bids / "sub-02" / "anat" / "sub-02_notasuffix.nii.gz").write_bytes(b"x")  # not a BIDS file name
    assert _run([bids, out, *args]) == 1
    assert not list(out.rglob("*_dseg.nii.gz"))
    log = next((out / "logs").glob("ms3seg_participant_*.log")).read_text()
    assert "is not a valid BIDS dataset" in log and "--skip-bids-validation" in log
    assert not [t for t in threading.enumerate() if t.name.startswith("ms3seg-startup")]
    assert "MODEL_LOAD_SECONDS" not in log


def test_networks_that_fail_to_load_in_the_background_fail_the_run_not_each_flair(tmp_path, tiny_model,
                                                                                  monkeypatch):
    """A model whose files match its card but which Keras refuses (e.g. custom code) is found
    while the first FLAIR is brain-extracted: the run stops with the model's error (exit 1, one
    line), no FLAIR is recorded as failed, nothing is written for it and the rest is not run."""
    from ms3seg_app.exceptions import ModelError
    from ms3seg_app.model import predict
    from ms3seg_app.model.card import card_path_for

    model = tmp_path / "model" / tiny_model.name  # a path of its own: no process-wide cached load
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    shutil.copy(card_path_for(tiny_model), card_path_for(model))

    def refused(card, indices, allow_unverified=False, verified=False):
        raise ModelError(f"cannot load {card.members[indices[0]].path}: refused by Keras safe mode")

    monkeypatch.setattr(predict, "load_members", refused)
    bids = tmp_path / "bids"
    shutil.copytree(EXAMPLE, bids)
    out = tmp_path / "out"
    assert _run([bids, out, "participant", "--skip-bids-validation", "--skull-strip", "none", "--device", "cpu",
                 "--no-reports", "--model", model]) == 1
    log = next((out / "logs").glob("ms3seg_participant_*.log")).read_text()
    assert "refused by Keras safe mode" in log and "finished:" not in log
    assert not list(out.rglob("*_dseg.nii.gz")) and not list((out / "logs").glob("crash-*"))
