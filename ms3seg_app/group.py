"""Group level: one table of every participant's burden (reads derivatives only).

This is the aggregation core; statistics, longitudinal change and the group HTML
report are the group-level issue's work.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .derivatives import atomic_write_text
from .exceptions import InputDataError

LOGGER = logging.getLogger("ms3seg.group")
GROUP_TABLE = "group_desc-trimask_volumes.tsv"


def collect_volumes(output_dir: Path) -> pd.DataFrame:
    """Concatenate every ``*_desc-trimask_volumes.tsv`` under ``output_dir`` (sorted, deterministic)."""
    # A path pattern rather than pybids: these are our own derivative tables with a
    # fixed name, and indexing a large output folder with pybids costs minutes.
    files = sorted(Path(output_dir).glob("sub-*/**/anat/*_space-orig_desc-trimask_volumes.tsv"))
    if not files:
        raise InputDataError(f"{output_dir} holds no participant results (*_desc-trimask_volumes.tsv); "
                             "run the participant level first")
    df = pd.concat([pd.read_csv(f, sep="\t", dtype={"participant_id": str, "session_id": str,
                                                    "acq": str, "run": str},
                                keep_default_na=False, na_values=["n/a", ""]) for f in files],
                   ignore_index=True)
    for col in ("session_id", "acq", "run"):  # BIDS writes missing entities as n/a
        df[col] = df[col].fillna("n/a")
    return df.sort_values(["participant_id", "session_id", "acq", "run"]).reset_index(drop=True)


def run_group(bids_dir: Path, output_dir: Path) -> Path:
    """Write ``group_desc-trimask_volumes.tsv`` joined with ``participants.tsv`` covariates."""
    df = collect_volumes(output_dir)
    pt = Path(bids_dir) / "participants.tsv"
    if pt.is_file():
        cov = pd.read_csv(pt, sep="\t", dtype={"participant_id": str}, keep_default_na=False,
                          na_values=["n/a", ""])
        df = df.merge(cov, on="participant_id", how="left")
    out = Path(output_dir) / GROUP_TABLE
    atomic_write_text(out, df.to_csv(sep="\t", index=False, float_format="%.6g", na_rep="n/a"))
    LOGGER.info("wrote %s (%d rows)", out, len(df))
    return out
