"""The participant pipeline as a nipype workflow: one node per stage, cached in the work dir.

Nodes (each a nipype ``Function`` node whose function imports what it needs, as nipype
requires)::

    check -> [n4] -> skullstrip -> segment -> lesions -> derivatives
                                  coreg_T1w / coreg_T2w ----^

Intermediate files live in ``<work_dir>/ms3seg_<prefix>/<node>/``; a re-run with the
same work dir reuses every node whose inputs did not change (nipype's hashing), so a
killed job resumes where it stopped. ``derivatives`` writes the final outputs
atomically with :mod:`ms3seg_app.derivatives`.
"""
from __future__ import annotations

import logging
from pathlib import Path

LOGGER = logging.getLogger("ms3seg.workflow")


# ----------------------------------------------------------------- node functions
# Each function runs in the node's own folder (the current directory) and returns paths.

def _check(in_file):
    import json
    import os

    import nibabel as nib

    from ms3seg_app.stages import load_flair

    img, warnings = load_flair(in_file)
    out = os.path.abspath("flair_checked.nii.gz")
    nib.save(img, out)
    qc = os.path.abspath("qc.json")
    with open(qc, "w") as fh:
        json.dump(warnings, fh)
    return out, qc


def _n4(in_file, enabled):
    import os

    if not enabled:
        return in_file
    import ants
    import nibabel as nib
    import numpy as np

    img = nib.load(in_file)
    a = ants.from_numpy(np.asarray(img.dataobj, np.float32))
    out = os.path.abspath("flair_n4.nii.gz")
    nib.save(nib.Nifti1Image(ants.n4_bias_field_correction(a).numpy().astype(np.float32), img.affine,
                             img.header), out)
    return out


def _skullstrip(in_file, method):
    import os

    import nibabel as nib
    import numpy as np

    from ms3seg_app.stages import brain_mask

    img = nib.load(in_file)
    mask, used = brain_mask(img, method, work_dir=os.getcwd())
    out = os.path.abspath("brain_mask.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine, img.header), out)
    return out, used


def _segment(in_file, mask_file, model, allow_unverified, tta):
    import os

    import nibabel as nib
    import numpy as np

    from ms3seg_app.model.predict import get_predictor
    from ms3seg_app.stages import restrict_to_brain

    pred = get_predictor(model or None, allow_unverified, tta)
    img = nib.load(in_file)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    res = pred.predict_image(img, restrict_to_brain(mask, img.header.get_zooms()[:3]))
    probs = os.path.abspath("probs.nii.gz")
    dseg = os.path.abspath("dseg.nii.gz")
    nib.save(nib.Nifti1Image(res.probabilities, img.affine), probs)
    nib.save(nib.Nifti1Image(res.dseg, img.affine), dseg)
    return dseg, probs, pred.sha256


def _lesions(dseg_file, probs_file, mask_file):
    import json
    import os

    import nibabel as nib
    import numpy as np

    from ms3seg_app.lesions import lesion_table, volume_table

    d = nib.load(dseg_file)
    dseg = np.asanyarray(d.dataobj).astype(np.uint8)
    probs = np.asanyarray(nib.load(probs_file).dataobj)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    table = lesion_table(dseg, d.affine, mask, probs[..., 3])
    vols = volume_table(dseg, d.affine, table, mask)
    lt = os.path.abspath("lesions.tsv")
    table.to_csv(lt, sep="\t", index=False)
    vj = os.path.abspath("volumes.json")
    with open(vj, "w") as fh:
        json.dump(vols, fh)
    return lt, vj


def _coreg(moving, flair_file, method):
    import os

    import nibabel as nib

    from ms3seg_app.stages import coregister_to_flair

    if not moving:
        return "", ""
    img, used = coregister_to_flair(moving, nib.load(flair_file), method, work_dir=os.getcwd())
    out = os.path.abspath("coreg.nii.gz")
    nib.save(img, out)
    return out, used


# ----------------------------------------------------------------- workflow
def build_workflow(fi, work_dir: Path, skull_strip: str = "auto", n4: bool = False, model: Path | None = None,
                   allow_unverified: bool = False, tta: bool = True):
    """Build the nipype workflow computing one FLAIR's intermediate results.

    Parameters
    ----------
    fi : FlairInput
    work_dir : Path
        Base folder; the workflow lives in ``work_dir/ms3seg_<prefix>``.

    Returns
    -------
    nipype.pipeline.engine.Workflow whose ``outputs`` node holds the file paths.
    """
    from nipype import Function, IdentityInterface, Node, Workflow

    name = "ms3seg_" + fi.prefix.replace("-", "")
    wf = Workflow(name=name, base_dir=str(work_dir))
    inputs = Node(IdentityInterface(fields=["flair", "t1w", "t2w"]), name="inputs")
    inputs.inputs.flair = str(fi.path)
    inputs.inputs.t1w = str(fi.t1w) if fi.t1w else ""
    inputs.inputs.t2w = str(fi.t2w) if fi.t2w else ""
    check = Node(Function(["in_file"], ["out_file", "qc_file"], _check), name="check")
    n4n = Node(Function(["in_file", "enabled"], ["out_file"], _n4), name="n4")
    n4n.inputs.enabled = bool(n4)
    bet = Node(Function(["in_file", "method"], ["mask_file", "method_used"], _skullstrip), name="skullstrip")
    bet.inputs.method = skull_strip
    seg = Node(Function(["in_file", "mask_file", "model", "allow_unverified", "tta"],
                        ["dseg_file", "probs_file", "model_sha256"], _segment), name="segment")
    seg.inputs.model = str(model) if model else ""
    seg.inputs.allow_unverified = bool(allow_unverified)
    seg.inputs.tta = bool(tta)
    les = Node(Function(["dseg_file", "probs_file", "mask_file"], ["lesions_tsv", "volumes_json"], _lesions),
               name="lesions")
    wf.connect([
        (inputs, check, [("flair", "in_file")]),
        (check, n4n, [("out_file", "in_file")]),
        (n4n, bet, [("out_file", "in_file")]),
        (n4n, seg, [("out_file", "in_file")]),
        (bet, seg, [("mask_file", "mask_file")]),
        (seg, les, [("dseg_file", "dseg_file"), ("probs_file", "probs_file")]),
        (bet, les, [("mask_file", "mask_file")]),
    ])
    for mod in ("T1w", "T2w"):
        if getattr(fi, mod.lower()) is None:
            continue
        reg = Node(Function(["moving", "flair_file", "method"], ["out_file", "method_used"], _coreg),
                   name=f"coreg_{mod}")
        reg.inputs.method = "fsl" if skull_strip == "fsl" else "auto"
        wf.connect([(inputs, reg, [(mod.lower(), "moving")]), (check, reg, [("out_file", "flair_file")])])
    return wf


#: (node, output) -> key of the result dict returned by :func:`run_workflow`.
RESULTS = {("check", "out_file"): "flair", ("check", "qc_file"): "qc_file",
           ("skullstrip", "mask_file"): "mask_file", ("skullstrip", "method_used"): "method_used",
           ("segment", "dseg_file"): "dseg_file", ("segment", "probs_file"): "probs_file",
           ("segment", "model_sha256"): "model_sha256", ("lesions", "lesions_tsv"): "lesions_tsv",
           ("lesions", "volumes_json"): "volumes_json",
           ("coreg_T1w", "out_file"): "T1w", ("coreg_T1w", "method_used"): "T1w_method",
           ("coreg_T2w", "out_file"): "T2w", ("coreg_T2w", "method_used"): "T2w_method"}


def run_workflow(wf, crash_dir: Path) -> dict:
    """Run a built workflow (Linear plugin) and return its results (keys of :data:`RESULTS`).

    Raises
    ------
    MS3SegError subclass or RuntimeError
        The first failing node's own exception message is re-raised (read from
        nipype's crash file) so the user sees what broke and how to fix it.
    """
    from nipype import config as ncfg

    from .exceptions import InputDataError

    crash_dir.mkdir(parents=True, exist_ok=True)
    wf.config["execution"].update({"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                                   "stop_on_first_crash": True, "remove_unnecessary_outputs": False,
                                   "hash_method": "content"})
    ncfg.set("monitoring", "enabled", "false")
    try:
        graph = wf.run(plugin="Linear")
    except Exception as exc:
        msg = _crash_message(crash_dir, wf.name) or str(exc)
        raise InputDataError(msg) from None
    res = {}
    for node in graph.nodes():
        outs = node.result.outputs
        for (name, field), key in RESULTS.items():
            if node.name == name:
                val = getattr(outs, field)
                if val not in (None, ""):
                    res[key] = val
    return res


def _crash_message(crash_dir: Path, wf_name: str) -> str | None:
    """The last line of the newest crash file's traceback of this workflow (the exception)."""
    files = sorted(Path(crash_dir).glob(f"crash-*{wf_name}*.txt"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    lines = [ln for ln in files[-1].read_text().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln and not ln.startswith(("Node", "Traceback", "  File")):
            return ln.split("Error:", 1)[1].strip()
    return None
