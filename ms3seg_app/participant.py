"""Participant level: one FLAIR in, BIDS-Derivatives out (all images on the FLAIR's grid).

Design: the stages run as a plain in-memory chain with per-FLAIR resume; nipype is
kept only for the FSL interfaces (BET, FLIRT). The stages are numpy operations of a
few seconds each on data that fits in memory, so nipype's file-based node cache bought
little and cost a lot: every intermediate was written to disk and read back, cached
results were keyed on node inputs that did not include the model (a new model was
served an old segmentation), nipype's import and crash files slowed and hid errors.
Resume is per FLAIR instead: a FLAIR whose outputs all exist and whose dseg sidecar
(written last) records the same input sha256 and the same run key (model card sha256,
package version, every option that changes the result) is skipped; anything else is
recomputed from the input. A killed job loses at most the FLAIR it was on.

The chain: :func:`~ms3seg_app.stages.load_flair` -> [N4] -> brain mask -> inference
(:class:`~ms3seg_app.model.predict.Predictor`, the card's post-processing) -> lesion
table and volumes -> T1w/T2w co-registration -> derivatives -> report -> sidecar.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__
from .bids import COREGISTERED, FlairInput
from .derivatives import (atomic_save_nifti, atomic_write_json, atomic_write_text, flair_outputs, image_like,
                          output_prefix, probability_image, raw_uri, resolve_crash_logs, safe_metadata)
from .exceptions import DISK_ERRORS, InputDataError
from .model.card import ModelCard, sha256_file

LOGGER = logging.getLogger("ms3seg.participant")


@dataclass(frozen=True)
class RunOptions:
    """Everything besides the input and the model that decides a FLAIR's outputs.

    Attributes
    ----------
    skull_strip : {"auto", "fsl", "deepbet", "none"}
    n4 : bool
        N4 bias-field correction before segmentation.
    tta : bool
        Left-right flip test-time augmentation.
    reports : bool
        Write the HTML report.
    members : tuple of int, optional
        0-based indices of the model card's members to run (default ``None``: all).
    crop : {"head", "brain"}
        In-plane crop of each slice the network sees (:class:`~ms3seg_app.model.predict.Predictor`).
    """

    skull_strip: str = "auto"
    n4: bool = False
    tta: bool = True
    reports: bool = True
    members: tuple | None = None
    crop: str = "head"


def run_key(card: ModelCard, options: RunOptions) -> str:
    """sha256 of what decides the result besides the input: model card, version, options.

    The model card's sha256 covers every member's weights and every preprocessing and
    post-processing parameter.
    """
    return _run_key(card, options, reports=True)


def _run_key(card: ModelCard, options: RunOptions, reports: bool) -> str:
    """:func:`run_key`, with ``reports`` as the key's value of the option (runs with
    ``--no-reports`` before 2026-12-03 wrote the key with False)."""
    opts = asdict(options)
    members = card.member_indices(opts.pop("members"))
    if members != card.member_indices():  # all members keeps the key of runs made before the option
        opts["members"] = list(members)
    # the crop is always in the key: results of the previous rule (one crop for the whole stack,
    # sidecars without InferenceCrop) differ slightly from the per-slice crops, so are recomputed
    # The report changes no result: every key is that of a run with reports (the default, so its
    # key is as before), and --no-reports redoes nothing; a missing report makes a FLAIR
    # incomplete where reports are asked for (expected_outputs)
    opts["reports"] = reports
    key = {"model_card_sha256": card.sha256, "ms3seg_app": __version__, **opts}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def expected_outputs(fi: FlairInput, output_dir: Path, card: ModelCard, reports: bool = True) -> dict[str, Path]:
    """Every file the participant level writes for ``fi`` with this model (names from :mod:`derivatives`)."""
    mods = [m for m in COREGISTERED if getattr(fi, m.lower()) is not None]
    paths = flair_outputs(fi.entities, output_dir, [c.abbreviation for c in card.foreground], mods)
    if not reports:
        paths.pop("report")
    return paths


def anatomical_sha256(fi: FlairInput) -> dict[str, str]:
    """sha256 of the anatomicals co-registered with a FLAIR.

    Recorded in the dseg sidecar (``CoregisteredSHA256``), so that a re-converted, added or
    removed T1w/T2w makes the FLAIR's results incomplete (:func:`is_complete`).

    Parameters
    ----------
    fi : FlairInput

    Returns
    -------
    dict
        Modality (``"T1w"``, ``"T2w"``; only those the FLAIR has) -> hex sha256 of its file,
        or :data:`UNREADABLE` for one that cannot be opened (e.g. a DataLad link whose content
        was not fetched: the FLAIR's results stand without it, until it can be read).
    """
    out = {}
    for mod in COREGISTERED:
        path = getattr(fi, mod.lower())
        if path is not None:
            try:
                out[mod] = sha256_file(path)
            except OSError:
                out[mod] = UNREADABLE
    return out


#: :func:`anatomical_sha256`'s value for an anatomical that cannot be opened.
UNREADABLE = "unreadable"


def _changed_since_0_3_0_fixes(path: Path) -> bool:
    """Whether results made before the fixes of 2026-12-03 (sidecars without
    ``CoregisteredSHA256``) differ for this FLAIR: stored with its slice axis other than the
    third, or with a pixdim that disagrees with its affine (header only is read)."""
    from .preprocessing.geometry import inferior_superior_axis, pixdim_disagrees

    img = nib.load(str(path))
    return inferior_superior_axis(img.affine) != 2 or pixdim_disagrees(img)[0]


def _signal_zero_restored(path: Path) -> bool:
    """Whether :func:`~ms3seg_app.stages.load_flair` restores this FLAIR's zero of signal
    (:func:`~ms3seg_app.stages.checks.restore_signal_zero`)."""
    from .stages import load_flair

    return bool(load_flair(path)[0].extra["signal_zero_restored"])


def is_complete(fi: FlairInput, output_dir: Path, card: ModelCard, options: RunOptions,
                source_sha: str | None = None) -> bool:
    """True if every output exists and was made from this input with this model and options.

    "This input" is the FLAIR and the T1w/T2w co-registered with it (their sha256 against
    the dseg sidecar's ``SourceSHA256`` and ``CoregisteredSHA256``); an input that cannot be
    read makes it False (the FLAIR is then processed, and fails alone).

    Parameters
    ----------
    fi : FlairInput
    output_dir : Path
    card : ModelCard
    options : RunOptions
    source_sha : str, optional
        The FLAIR's sha256 if the caller has it already (hashed otherwise).
    """
    paths = expected_outputs(fi, output_dir, card, options.reports)
    try:
        side = json.loads(paths["dseg_json"].read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    for mod in side.get("AnatomicalsNotUsed") or {}:  # a T1w/T2w that could not be used has no outputs
        paths.pop(mod, None)
        paths.pop(f"{mod}_json", None)
    if not all(p.exists() for p in paths.values()):
        return False
    # results made with --no-reports before it left the key (2026-12-03) carry its old key
    keys = (run_key(card, options), _run_key(card, options, reports=False))
    if side.get("SourceSHA256") != (source_sha or sha256_file(fi.path)) or side.get("RunKey") not in keys:
        return False
    try:
        if "CoregisteredSHA256" not in side:
            # made before the key existed (2026-12-03): the anatomicals were not recorded (taken
            # as unchanged, as group.missing_outputs takes sidecars without Outputs); redone
            # only where that day's fixes change the result
            if _changed_since_0_3_0_fixes(fi.path):
                return False
        elif side["CoregisteredSHA256"] != anatomical_sha256(fi):
            return False
        # made before FLAIRs without a zero of signal got it back (load_flair, 2026-12-03): redone
        # if this FLAIR is one (its data are read, at every resume, for such older sidecars only)
        return "SignalZeroRestored" in side or not _signal_zero_restored(fi.path)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError, InputDataError):
        return False  # unreadable or refused: process_flair fails it alone


def _remove_stale_temporaries(paths: dict[str, Path]) -> None:
    """Delete temporary files a killed run left beside this FLAIR's outputs.

    Only this FLAIR's own temporaries (``.<output name>.*.tmp``) are touched: one FLAIR
    is processed by one job at a time, so they cannot belong to a live writer.
    """
    for p in paths.values():
        if p.parent.is_dir():
            for tmp in p.parent.glob(f".{p.name}.*.tmp"):
                tmp.unlink(missing_ok=True)


def qc_warnings(img, card: ModelCard, probs: np.ndarray, dseg: np.ndarray, mask: np.ndarray) -> list[str]:
    """Warnings for the report: geometry outside training, brain mask, low confidence.

    Parameters
    ----------
    img : Nifti1Image, the FLAIR
    card : ModelCard (its ``training_geometry``)
    probs : ndarray (I', J', K', C) float, the probabilities in a region of the grid
        (:attr:`~ms3seg_app.model.predict.Prediction.box`, or the whole grid)
    dseg : ndarray (I', J', K') uint8, the tri-mask in the same region (0 outside it)
    mask : ndarray (I, J, K) bool brain mask

    Returns
    -------
    list of str, one sentence per warning (empty when nothing is unusual)
    """
    from .preprocessing.geometry import axial_voxel_sizes

    w = []
    ras_z = axial_voxel_sizes(img.affine)  # (x, y, z) mm
    tr = card.training_geometry
    thick, inplane = tr.get("slice_thickness_mm"), tr.get("inplane_mm")
    if thick and not thick[0] <= ras_z[2] <= thick[1]:
        w.append(f"axial slice thickness {ras_z[2]:.2f} mm is outside the {thick} mm the model was "
                 "trained on; check the segmentation closely")
    if inplane and not (inplane[0] <= min(ras_z[:2]) and max(ras_z[:2]) <= inplane[1]):
        w.append(f"in-plane voxel size {ras_z[0]:.2f}x{ras_z[1]:.2f} mm is outside the trained {inplane} mm")
    icv_ml = float(mask.sum()) * float(np.prod(ras_z)) / 1000.0
    if icv_ml < 800 or icv_ml > 2200:
        w.append(f"the brain mask holds {icv_ml:.0f} mL (adult ICV is about 1100-1800 mL): check the "
                 "brain-mask contour in the report, and the scan's coverage")
    fg = dseg > 0
    if fg.any():
        low = float((probs[fg].max(axis=-1) < 0.6).mean())
        if low > 0.3:
            w.append(f"{100 * low:.0f}% of the segmented voxels have a winning probability below 0.6 "
                     "(low confidence)")
    return w


@dataclass
class FlairResult:
    """What one FLAIR produced (for the console line and the run summary)."""

    prefix: str
    status: str  # "ok" | "skipped"
    volumes: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def flair_lock(output_dir: Path, prefix: str):
    """Exclusive lock on one FLAIR's outputs across processes and jobs (``fcntl.flock``).

    Two jobs given the same participant (a resubmitted array task, two users) take turns:
    the second waits, then finds the outputs complete and skips. The kernel drops the
    lock when its holder dies, so a killed job leaves no stale lock. The lock files live
    in ``logs/locks/``. On file systems without ``flock`` the lock degrades to nothing,
    with a warning (atomic writes still keep every file whole).
    """
    import fcntl

    from .derivatives import flair_lock_path

    path = flair_lock_path(output_dir, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. a network file system without lock support
            LOGGER.warning("%s: cannot lock %s (%s); not protected against a concurrent job", prefix, path, exc)
        try:
            yield
        finally:
            try:
                fcntl.flock(fh, fcntl.LOCK_UN)
            except OSError:
                pass


class _Timer:
    """Times the stages of one FLAIR and names the stage an exception came from."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            exc.ms3seg_stage = getattr(exc, "ms3seg_stage", name)  # the class and traceback are kept
            raise
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def process_flair(fi: FlairInput, predictor, output_dir: Path, options: RunOptions, work_dir: Path | None = None,
                  bids_dir: Path | None = None, source_sha: str | None = None) -> FlairResult:
    """Run the participant chain on one FLAIR and write its derivatives.

    Derivatives are written atomically, the dseg sidecar last (it lists every output
    under ``Outputs`` and marks the FLAIR complete), so an interrupted run is redone on
    resume and finished work is skipped.

    Parameters
    ----------
    fi : FlairInput
    predictor : Predictor
        The loaded model.
    output_dir : Path
    options : RunOptions
    work_dir : Path, optional
        Scratch space for FSL.
    bids_dir : Path, optional
        Root of the raw dataset (``Sources`` are given relative to it).
    source_sha : str, optional
        The FLAIR's sha256 if the caller hashed it already (hashed here otherwise).

    Returns
    -------
    FlairResult

    Raises
    ------
    MS3SegError
        Bad input (the message names the file and the fix); nothing is written for this FLAIR.
    Exception
        A bug in a stage, with its own class and traceback; ``exc.ms3seg_stage`` names the stage.
    """
    t0 = time.time()
    card = predictor.card
    prefix = output_prefix(fi.entities)
    paths = expected_outputs(fi, output_dir, card, options.reports)
    timer = _Timer()
    if source_sha is None:
        source_sha = timer.run("hash", sha256_file, fi.path)
    with flair_lock(output_dir, prefix):
        if is_complete(fi, output_dir, card, options, source_sha):
            return FlairResult(prefix, "skipped")
        _remove_stale_temporaries(paths)  # under the lock: no live writer owns them
        # the previous results' completion marker goes before anything is written: a rerun that
        # fails or is killed part-way leaves the FLAIR incomplete (the group level flags it),
        # never this run's first tables beside the previous run's sidecar
        paths["dseg_json"].unlink(missing_ok=True)
        # co-registered images of a T1w/T2w no longer there (removed, or filtered out) go too, and
        # with --no-reports an earlier report, which would show the previous results
        every = flair_outputs(fi.entities, output_dir, modalities=COREGISTERED)
        for key in (k for m in COREGISTERED for k in (m, f"{m}_json") if k not in paths):
            every[key].unlink(missing_ok=True)
        if "report" not in paths:
            every["report"].unlink(missing_ok=True)
        return _process_locked(fi, predictor, output_dir, options, work_dir, bids_dir, paths, prefix, timer,
                               source_sha, t0)


def _process_locked(fi, predictor, output_dir, options, work_dir, bids_dir, paths, prefix, timer, source_sha,
                    t0) -> FlairResult:
    """The chain of :func:`process_flair`, run while holding the FLAIR's lock."""
    import pandas as pd

    from .lesions import lesion_table, volume_table
    from .preprocessing.geometry import axial_voxel_sizes, inferior_superior_axis
    from .stages import brain_mask, coregister_to_flair, load_flair, n4_correct, restrict_to_brain

    card = predictor.card
    used = card.member_indices(options.members)
    if tuple(predictor.member_indices) != used:
        # the sidecar, run key and report name the members from the options: they must be the ones run
        raise ValueError(f"the predictor runs members {predictor.member_indices} of {card.name}, the run options "
                         f"name {used}")
    img, warnings = timer.run("checks", load_flair, fi.path)
    seg_img = timer.run("n4", n4_correct, img) if options.n4 else img
    # the model's slices are made before brain extraction: their working memory (a copy of the
    # FLAIR for its intensity percentiles, the head's labels, the normalised FLAIR: 0.3 GB
    # each for a 512x512x300 scan) is then not added to what deepbet's 256^3 network leaves
    # held by TensorFlow's allocator
    slices = timer.run("slicing", predictor.prepare, seg_img)
    mask, method, note = timer.run("brain_extraction", brain_mask, seg_img, options.skull_strip, work_dir)
    if note:
        warnings.append(note)
    spacing = tuple(float(z) for z in nib.affines.voxel_sizes(img.affine)[:3])  # mm, stored axes
    keep = restrict_to_brain(mask, spacing, inferior_superior_axis(img.affine))
    pred = timer.run("inference", predictor.predict_image, seg_img, keep, slices=slices)
    del keep
    del slices
    # the inference stage in its parts (network, resampling back to the FLAIR grid, ...)
    timer.timings.update({f"inference.{k}": v for k, v in pred.timings.items()})
    awmh = card.lesion_class
    lesions = timer.run("lesion_analysis", lesion_table, pred.dseg, img.affine, mask,
                        pred.box_probabilities[..., awmh], pred.box_uncertainty, lesion_class=awmh,
                        ventricle_class=card.class_index("VEN"), value_box=pred.box)
    volumes = volume_table(pred.dseg, img.affine, lesions, mask, card)
    coreg_sha = anatomical_sha256(fi)  # the files co-registration reads next, for the sidecar
    coreg, coreg_methods, not_used = {}, {}, {}
    for mod in COREGISTERED:
        src = getattr(fi, mod.lower())
        if src is not None:
            try:
                coreg[mod], coreg_methods[mod] = timer.run(
                    f"coregistration_{mod}", coregister_to_flair, src, img,
                    "fsl" if options.skull_strip == "fsl" else "auto", work_dir, mod)
            except InputDataError as exc:  # an optional anatomical: the FLAIR's results stand without it
                not_used[mod] = str(exc)
                warnings.append(f"the {mod} was not used: {exc}")
                for key in (mod, f"{mod}_json"):  # nor is a co-registered image of an earlier run kept
                    paths.pop(key).unlink(missing_ok=True)
    warnings += qc_warnings(img, card, pred.box_probabilities, pred.dseg[pred.box], mask)
    t_write = time.perf_counter()
    # ---- derivatives (the dseg sidecar is the completion marker: written last)
    raw = raw_uri(fi.path, bids_dir)
    space = {"SpatialReference": raw}
    software = "; ".join(f"{k} {v}" for k, v in sorted((card.data.get("software") or {}).items())
                         if k != "ms3seg_app")
    model_info = {"ModelName": card.name, "ModelSHA256": card.sha256, "ModelMembers": len(card.members),
                  "ModelMembersUsed": list(used),
                  "SkullStripping": method, "N4BiasCorrection": bool(options.n4),
                  "TestTimeAugmentation": bool(options.tta), "InferenceCrop": options.crop,
                  "SoftwareVersions": f"ms3seg-app {__version__}" + (f"; model trained with {software}"
                                                                     if software else "")}
    atomic_save_nifti(image_like(mask, img, np.uint8), paths["mask"])
    atomic_write_json(paths["mask_json"], {"Sources": [raw], **space, "Type": "Brain", "Method": method,
                                           "Description": f"brain mask ({method})"})
    for c in card.foreground:
        atomic_save_nifti(probability_image(pred.box_probabilities[..., c.index], img, pred.box,
                                            outside=float(pred.outside[c.index])),
                          paths[f"probseg_{c.abbreviation}"])
        atomic_write_json(paths[f"probseg_{c.abbreviation}_json"], {
            "Sources": [raw], **space, "Label": c.abbreviation, "Description": f"probability of {c.name}",
            "ModelName": card.name, "ModelSHA256": card.sha256})
    dseg = pred.dseg
    del pred  # the probabilities (4 float16 per voxel) are written: the rest needs the tri-mask only
    atomic_save_nifti(image_like(dseg, img, np.uint8), paths["dseg"])
    for mod, cimg in coreg.items():
        atomic_save_nifti(cimg, paths[mod])
        atomic_write_json(paths[f"{mod}_json"], {"Sources": [raw_uri(getattr(fi, mod.lower()), bids_dir)],
                                                 **space, "SkullStripped": False,
                                                 "Description": f"{mod} rigidly co-registered to the FLAIR",
                                                 "RegistrationMethod": coreg_methods[mod]})
    atomic_write_text(paths["lesions"], lesions.to_csv(sep="\t", index=False, float_format="%.4f", na_rep="n/a"))
    axial = axial_voxel_sizes(img.affine)
    run = fi.entities.get("run")  # pybids' padded index: written as named (01), not as a number
    vrow = {"participant_id": f"sub-{fi.entities['subject']}", "session_id":
            f"ses-{fi.entities['session']}" if fi.entities.get("session") else "n/a",
            "acq": fi.entities.get("acquisition") or "n/a", "run": str(run) if run is not None else "n/a",
            "flair": fi.path.name, **volumes, "qc_warnings": len(warnings),
            # axial, as the model slices it and qc_warnings checks it
            "slice_thickness_mm": axial[2], "inplane_mm": min(axial[:2])}
    atomic_write_text(paths["volumes"], pd.DataFrame([vrow]).to_csv(sep="\t", index=False, float_format="%.6g",
                                                                       na_rep="n/a"))
    timer.timings["derivatives"] = time.perf_counter() - t_write
    result = FlairResult(prefix, "ok", volumes, warnings)
    if options.reports:
        try:
            from .reports.individual import write_participant_report

            timer.run("report", write_participant_report, paths["report"], title=prefix, flair_name=fi.path.name,
                      flair=img, dseg=dseg, brain_mask=mask, coreg=coreg, lesions=lesions, volumes=volumes,
                      warnings=warnings, metadata=safe_metadata(fi.metadata),
                      provenance=_provenance(card, used, options, method, coreg_methods), classes=card.classes)
        except Exception as exc:  # a failed report never loses the segmentation (fMRIPrep's rule)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
                raise  # the disk is full or read-only: this FLAIR fails (one line says so), the next run redoes it
            LOGGER.warning("%s: the HTML report failed (%s: %s); the derivatives are complete (traceback in the "
                           "run's log)", prefix, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            LOGGER.debug("%s: the HTML report failed:\n%s", prefix, traceback.format_exc())
            result.warnings.append("report failed (traceback in the log)")
            paths.pop("report", None)
    outputs = sorted(str(p.relative_to(output_dir)) for k, p in paths.items())
    atomic_write_json(paths["dseg_json"], {
        "Sources": [raw], **space, "SourceSHA256": source_sha, "RunKey": run_key(card, options),
        "CoregisteredSHA256": coreg_sha, "AnatomicalsNotUsed": not_used,
        "SignalZeroRestored": bool(img.extra["signal_zero_restored"]),
        "Manual": False, "Atlas": "MS3SEG tri-mask", "Description": "MS3SEG tri-mask by ms3seg-app",
        "Labels": {str(c.index): c.name for c in card.classes},
        "LesionDefinition": _lesion_definition(), "QCWarnings": result.warnings,
        "AcquisitionMetadata": safe_metadata(fi.metadata), "Outputs": outputs, **model_info})
    resolve_crash_logs(output_dir, prefix)  # earlier failures of this FLAIR no longer hold
    result.timings = timer.timings
    result.seconds = time.time() - t0
    return result


def _lesion_definition() -> dict:
    from .lesion_definition import LESION

    return LESION.to_dict()


def _provenance(card: ModelCard, used: tuple, options: RunOptions, method: str, coreg_methods: dict) -> dict:
    """What ran, for the report's methods section (``used``: the card's members that ran)."""
    import datetime

    cv = card.data.get("cross_validation", {}).get("mean", {})
    return {"ms3seg_app_version": __version__, "model_name": card.name, "model_sha256": card.sha256,
            "ensemble_members": len(used), "card_members": len(card.members),
            "members_used": list(used), "tta": options.tta, "crop": options.crop,
            "skull_stripping": method,
            "n4": options.n4, "coregistration": coreg_methods,
            "software": {k: str(v) for k, v in (card.data.get("software") or {}).items()},
            "cross_validation": cv, "lesion_definition": _lesion_definition(),
            "run_date": datetime.date.today().isoformat()}
