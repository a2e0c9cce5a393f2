"""Participant level: one FLAIR in, BIDS-Derivatives out (all images on the FLAIR's grid)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from . import CLASSES, __version__
from .bids import FlairInput
from .derivatives import atomic_save_nifti, atomic_write_json, atomic_write_text, image_like, safe_metadata
from .model.card import sha256_file

LOGGER = logging.getLogger("ms3seg.participant")
PROB_LABELS = {1: "VEN", 2: "NWMH", 3: "AWMH"}


def output_paths(fi: FlairInput, output_dir: Path) -> dict[str, Path]:
    """Every file the participant level writes for one FLAIR."""
    d = Path(output_dir) / fi.subdir
    p = fi.prefix
    out = {
        "dseg": d / f"{p}_space-orig_desc-trimask_dseg.nii.gz",
        "dseg_json": d / f"{p}_space-orig_desc-trimask_dseg.json",
        "mask": d / f"{p}_space-orig_desc-brain_mask.nii.gz",
        "mask_json": d / f"{p}_space-orig_desc-brain_mask.json",
        "lesions": d / f"{p}_space-orig_desc-trimask_lesions.tsv",
        "volumes": d / f"{p}_space-orig_desc-trimask_volumes.tsv",
        "report": Path(output_dir) / f"{p}.html",
    }
    for c, lab in PROB_LABELS.items():
        out[f"probseg_{lab}"] = d / f"{p}_space-orig_label-{lab}_probseg.nii.gz"
    for mod in ("T1w", "T2w"):
        if getattr(fi, mod.lower()) is not None:
            out[mod] = d / f"{p}_space-orig_desc-coreg_{mod}.nii.gz"
            out[f"{mod}_json"] = d / f"{p}_space-orig_desc-coreg_{mod}.json"
    return out


def _remove_stale_temporaries(paths: dict[str, Path]) -> None:
    """Delete temporary files a killed run left beside this FLAIR's outputs.

    Only this FLAIR's own temporaries (``.<output name>.*.tmp``) are touched: one FLAIR
    is processed by one job at a time, so they cannot belong to a live writer.
    """
    for p in paths.values():
        if p.parent.is_dir():
            for tmp in p.parent.glob(f".{p.name}.*.tmp"):
                tmp.unlink(missing_ok=True)


def is_complete(fi: FlairInput, output_dir: Path, model_sha: str, source_sha: str | None = None) -> bool:
    """True if every output exists and was made from this input with this model (resume).

    ``source_sha`` is the FLAIR's sha256 if the caller has it already (hashed otherwise).
    """
    paths = output_paths(fi, output_dir)
    if not all(p.exists() for p in paths.values()):
        return False
    try:
        side = json.loads(paths["dseg_json"].read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (side.get("SourceSHA256") == (source_sha or sha256_file(fi.path))
            and side.get("ModelSHA256") == model_sha)


def qc_warnings(img: nib.Nifti1Image, card: dict, probs: np.ndarray, dseg: np.ndarray) -> list[str]:
    """Warnings for the report: geometry outside training, unusual intensity, low confidence."""
    w = []
    ras_z = [float(z) for z in nib.as_closest_canonical(img).header.get_zooms()[:3]]  # (x, y, z) mm
    tr = card.get("training_geometry", {"slice_thickness_mm": [4.0, 8.5], "inplane_mm": [0.7, 1.3]})
    if not tr["slice_thickness_mm"][0] <= ras_z[2] <= tr["slice_thickness_mm"][1]:
        w.append(f"axial slice thickness {ras_z[2]:.2f} mm is outside the {tr['slice_thickness_mm']} mm "
                 "the model was trained on; check the segmentation closely")
    if not (tr["inplane_mm"][0] <= min(ras_z[:2]) and max(ras_z[:2]) <= tr["inplane_mm"][1]):
        w.append(f"in-plane voxel size {ras_z[0]:.2f}x{ras_z[1]:.2f} mm is outside the trained "
                 f"{tr['inplane_mm']} mm")
    fg = dseg > 0
    if fg.any():
        low = float((probs.max(axis=-1)[fg] < 0.6).mean())
        if low > 0.3:
            w.append(f"{100 * low:.0f}% of the segmented voxels have a winning probability below 0.6 "
                     "(low confidence)")
    return w


def process_flair(fi: FlairInput, predictor, output_dir: Path, work_dir: Path, skull_strip: str = "auto",
                  n4: bool = False, reports: bool = True, container: dict | None = None,
                  model: Path | None = None, allow_unverified: bool = False, tta: bool = True) -> dict:
    """Run the participant pipeline on one FLAIR and write its derivatives.

    The stages run as a nipype workflow (:mod:`ms3seg_app.workflow`) cached in
    ``work_dir``; then the derivatives are written atomically, the dseg sidecar last,
    so an interrupted run is redone on resume and finished work is skipped.

    Parameters
    ----------
    fi : FlairInput
    predictor : Predictor
        The loaded model (its card and sha256 are recorded; the segment node reuses it).

    Returns
    -------
    dict summary (prefix, volumes, warnings, seconds).

    Raises
    ------
    InputDataError
        Bad image or failing stage; nothing is written for this FLAIR.
    """
    import pandas as pd

    from .workflow import build_workflow, run_workflow

    t0 = time.time()
    paths = output_paths(fi, output_dir)
    source_sha = sha256_file(fi.path)  # once: the resume check and the dseg sidecar
    if is_complete(fi, output_dir, predictor.sha256, source_sha):
        LOGGER.info("%s: outputs complete, skipped (resume)", fi.prefix)
        return {"prefix": fi.prefix, "status": "skipped (complete)"}
    _remove_stale_temporaries(paths)
    wf = build_workflow(fi, Path(work_dir), skull_strip, n4, model, allow_unverified, tta)
    res = run_workflow(wf, Path(work_dir) / "crash")
    ref = nib.load(str(fi.path))
    img = nib.load(res["flair"])
    warnings = json.loads(Path(res["qc_file"]).read_text())
    dseg = np.asanyarray(nib.load(res["dseg_file"]).dataobj).astype(np.uint8)
    probs = np.asanyarray(nib.load(res["probs_file"]).dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(res["mask_file"]).dataobj) > 0
    lesions = pd.read_csv(res["lesions_tsv"], sep="\t")
    volumes = json.loads(Path(res["volumes_json"]).read_text())
    warnings += qc_warnings(img, predictor.card, probs, dseg)
    zooms = img.header.get_zooms()[:3]
    # ---- derivatives (the dseg sidecar is the completion marker: written last)
    src_rel = f"bids:raw:{fi.path.name}"
    model_info = {"ModelName": predictor.card.get("name"), "ModelSHA256": predictor.sha256,
                  "SkullStripping": res["method_used"], "N4BiasCorrection": bool(n4),
                  "SoftwareVersions": predictor.card.get("software", {}) | {"ms3seg_app": __version__}}
    atomic_save_nifti(image_like(dseg, ref, np.uint8), paths["dseg"])
    atomic_save_nifti(image_like(mask, ref, np.uint8), paths["mask"])
    atomic_write_json(paths["mask_json"], {"Sources": [src_rel], "Type": "Brain", "Method": res["method_used"]})
    for c, lab in PROB_LABELS.items():
        atomic_save_nifti(image_like(probs[..., c], ref, np.float32), paths[f"probseg_{lab}"])
    for mod in ("T1w", "T2w"):
        if mod in res:
            atomic_save_nifti(image_like(np.asanyarray(nib.load(res[mod]).dataobj), ref, np.float32), paths[mod])
            atomic_write_json(paths[f"{mod}_json"], {"Sources": [f"bids:raw:{getattr(fi, mod.lower()).name}"],
                                                     "SpatialReference": src_rel,
                                                     "RegistrationMethod": res.get(f"{mod}_method")})
    atomic_write_text(paths["lesions"], lesions.to_csv(sep="\t", index=False, float_format="%.4f", na_rep="n/a"))
    vrow = {"participant_id": f"sub-{fi.entities['subject']}", "session_id":
            f"ses-{fi.entities['session']}" if fi.entities.get("session") else "n/a",
            "acq": fi.entities.get("acquisition") or "n/a", "run": fi.entities.get("run") or "n/a",
            "flair": fi.path.name, **volumes, "qc_warnings": len(warnings),
            "slice_thickness_mm": float(sorted(zooms)[-1]), "inplane_mm": float(min(zooms))}
    atomic_write_text(paths["volumes"], pd.DataFrame([vrow]).to_csv(sep="\t", index=False, float_format="%.6g",
                                                                       na_rep="n/a"))
    summary = {"prefix": fi.prefix, "volumes": volumes, "warnings": warnings, "status": "ok"}
    if reports:
        try:
            from .reports.individual import write_participant_report

            write_participant_report(paths["report"], fi, img, dseg, lesions, volumes, warnings,
                                     model_info, safe_metadata(fi.metadata))
        except Exception:  # a failed report never loses the segmentation (fMRIPrep's rule)
            LOGGER.exception("%s: the HTML report failed; the derivatives are complete", fi.prefix)
            summary["warnings"].append("report failed")
    atomic_write_json(paths["dseg_json"], {
        "Sources": [src_rel], "SourceSHA256": source_sha,
        "Manual": False, "Atlas": "MS3SEG tri-mask",
        "Labels": {str(i): n for i, (n, _a, _c) in CLASSES.items()},
        "QCWarnings": warnings, "AcquisitionMetadata": safe_metadata(fi.metadata), **model_info})
    summary["seconds"] = time.time() - t0
    LOGGER.info("%s: done in %.1f s (%d lesions, %.2f mL abnormal WMH)", fi.prefix, summary["seconds"],
                volumes["lesion_count"], volumes["abnormal_wmh_ml"])
    return summary
