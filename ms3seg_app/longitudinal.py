"""Longitudinal change between consecutive sessions of a participant.

For each participant with several sessions (in the order of
:func:`~ms3seg_app.group.order_sessions`: acquisition time from ``sessions.tsv``, else the
labels' numbers), the first FLAIR of each later session (by acq, run) is rigidly
registered to that of the previous one (ANTsPy, mutual information) and its
tri-mask is resampled onto the earlier grid (nearest label). Then, with 26-connected
lesions as :data:`~ms3seg_app.lesion_definition.LESION` defines them:

new lesion
    a later lesion that overlaps no earlier lesion;
enlarging lesion
    a later lesion that overlaps earlier lesions and whose volume is at least
    ``ENLARGE_RATIO`` = 1.5 times theirs, and larger by at least the minimum lesion volume.

(These follow the usual MS trial definitions of new/enlarging T2 lesions, simplified:
no visual confirmation, and the thresholds are stated here rather than assumed.)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .lesion_definition import LESION

LOGGER = logging.getLogger("ms3seg.longitudinal")
ENLARGE_RATIO = 1.5
VOLUMES = ("abnormal_wmh_ml", "normal_wmh_ml", "ventricles_ml")


def lesion_changes(earlier: np.ndarray, later: np.ndarray, voxel_mm3: float) -> dict:
    """New and enlarging lesions between two lesion masks on the same grid.

    Parameters
    ----------
    earlier, later : ndarray (I, J, K) bool
        Abnormal-WMH masks, ``later`` already resampled onto the earlier grid.
    voxel_mm3 : float
        Voxel volume.

    Returns
    -------
    dict with n_new, n_enlarging, new_volume_mm3.
    """
    le, ne = LESION.label(earlier, voxel_mm3)
    ll, nl = LESION.label(later, voxel_mm3)
    e_sizes = np.bincount(le.ravel(), minlength=ne + 1)
    n_new = n_enl = 0
    new_vol = 0.0
    for i, sl in enumerate(ndimage.find_objects(ll), start=1):
        comp = ll[sl] == i
        size = int(comp.sum())
        hits = np.unique(le[sl][comp])
        hits = hits[hits > 0]
        if hits.size == 0:
            n_new += 1
            new_vol += size * voxel_mm3
        else:
            before = int(e_sizes[hits].sum())
            if size >= ENLARGE_RATIO * before and (size - before) * voxel_mm3 >= LESION.min_volume_mm3:
                n_enl += 1
    return {"n_new_lesions": n_new, "n_enlarging_lesions": n_enl, "new_lesion_volume_mm3": new_vol}


def register_labels(fixed_flair: Path, moving_flair: Path, moving_dseg: Path) -> np.ndarray:
    """Rigidly register ``moving_flair`` to ``fixed_flair`` and bring ``moving_dseg`` along.

    Returns
    -------
    ndarray on the fixed image's voxel grid (stored order), uint8 labels.
    """
    import tempfile

    import ants

    from .stages.registration import ants_rigid

    fixed = ants.image_read(str(fixed_flair))
    with tempfile.TemporaryDirectory(prefix="ms3seg_rigid_") as tmp:  # the transform files, removed after use
        reg = ants_rigid(fixed, ants.image_read(str(moving_flair)), Path(tmp))
        lab = ants.image_read(str(moving_dseg))
        out = ants.apply_transforms(fixed=fixed, moving=lab, transformlist=reg["fwdtransforms"],
                                    interpolator="genericLabel")
    return np.rint(out.numpy()).astype(np.uint8)


def _paths(row, bids_dir: Path, output_dir: Path) -> tuple[Path, Path]:
    """(input FLAIR, its tri-mask) of a group-table row: the input as its dseg sidecar names it
    (``source``, a ``bids:raw:`` URI), the tri-mask named by :mod:`derivatives` from the row's
    output prefix (ValueError if the row names no input)."""
    from .derivatives import flair_entities, flair_outputs, raw_path

    return (raw_path(row.get("flair_source", ""), bids_dir),
            flair_outputs(flair_entities(row["prefix"]), output_dir)["dseg"])


def longitudinal_changes(df: pd.DataFrame, bids_dir: Path, output_dir: Path, classes=None) -> pd.DataFrame:
    """Change between consecutive sessions of every participant with several sessions.

    Each session is represented by its first FLAIR (by ``acq``, then ``run``), all of whose
    values are used (never values of another FLAIR of the session).

    Parameters
    ----------
    df : DataFrame
        The group table, one row per FLAIR; sessions in the order of
        :func:`~ms3seg_app.group.order_sessions` (read here from ``bids_dir`` unless ``df``
        already carries its ``session_rank``).
    bids_dir : Path
        The BIDS dataset (input FLAIRs; ``sessions.tsv`` acquisition times).
    output_dir : Path
        The participant level's output folder (tri-masks, class table).
    classes : list or None
        The run's class table (:func:`~ms3seg_app.derivatives.read_class_table`), if the
        caller has read it; else it is read here. Its lesion class is the label compared.

    Returns
    -------
    DataFrame: participant_id, session_from, session_to, session_order (``"acq_time"``:
    sessions ordered by ``sessions.tsv`` acquisition times; ``"label"``: by their labels),
    ``delta_<volume>`` (mL, later minus earlier) for abnormal WMH, normal WMH and ventricles,
    n_new_lesions, n_enlarging_lesions, new_lesion_volume_mm3 (mm³), registration
    ("antspy-rigid" or the error).
    """
    import nibabel as nib

    from .derivatives import CLASS_TABLE, read_class_table
    from .exceptions import ModelError
    from .model.card import LESION_CLASS, class_index

    try:  # the lesion label of these outputs, from the class table their run wrote
        table = read_class_table(output_dir) if classes is None else classes
        lesion, why = class_index(table, LESION_CLASS, str(Path(output_dir) / CLASS_TABLE)), ""
    except (OSError, ModelError, KeyError, ValueError) as exc:
        lesion, why = None, f"no lesion label ({exc})"

    from .group import order_sessions

    rows = []
    ses = order_sessions(df, bids_dir)
    ses = ses[ses["session_id"] != "n/a"]
    for sub, g in ses.groupby("participant_id", sort=False):
        g = g.drop_duplicates("session_id")  # the first FLAIR of each session, whole
        for (_, a), (_, b) in zip(g.iloc[:-1].iterrows(), g.iloc[1:].iterrows()):
            row = {"participant_id": sub, "session_from": a["session_id"], "session_to": b["session_id"],
                   "session_order": a["session_order"]}
            for v in VOLUMES:
                row[f"delta_{v}"] = float(b[v]) - float(a[v])
            try:
                if lesion is None:
                    raise ModelError(why)
                (fa, da), (fb, db) = _paths(a, bids_dir, output_dir), _paths(b, bids_dir, output_dir)
                later = register_labels(fa, fb, db) == lesion
                ea = nib.load(str(da))
                earlier = np.asanyarray(ea.dataobj) == lesion
                row.update(lesion_changes(earlier, later, float(abs(np.linalg.det(ea.affine[:3, :3])))))
                row["registration"] = "antspy-rigid"
            except Exception as exc:  # missing image or failed registration: keep the volume changes
                LOGGER.warning("%s %s->%s: lesion change not computed (%s)", sub, a["session_id"],
                               b["session_id"], exc)
                row.update({"n_new_lesions": np.nan, "n_enlarging_lesions": np.nan,
                            "new_lesion_volume_mm3": np.nan, "registration": f"failed: {exc}"[:200]})
            rows.append(row)
    cols = ["participant_id", "session_from", "session_to", "session_order"] + [f"delta_{v}" for v in VOLUMES] + \
        ["n_new_lesions", "n_enlarging_lesions", "new_lesion_volume_mm3", "registration"]
    return pd.DataFrame(rows, columns=cols)
