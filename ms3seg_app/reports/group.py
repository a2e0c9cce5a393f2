"""Group HTML report: sortable table, distributions, burden vs age, locations, change, stats, QC.

Self-contained (figures embedded as PNG data URIs, inline CSS and a few lines of
inline JavaScript for sorting: no library is loaded, so it works offline) and rendered
with jinja2 autoescaping.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CLASSES, __version__
from ..derivatives import atomic_write_text
from .individual import _env

TABLE_COLUMNS = ["participant_id", "session_id", "acq", "run", "abnormal_wmh_ml", "normal_wmh_ml",
                 "ventricles_ml", "icv_ml", "lesion_count", "lesion_periventricular_share", "age", "sex",
                 "group", "qc_flags"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figures(df: pd.DataFrame, long: pd.DataFrame) -> list[dict]:
    """PNG figures (base64) with captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    measures = [("abnormal_wmh_icv_fraction", "abnormal WMH", CLASSES[3][2]),
                ("normal_wmh_icv_fraction", "normal WMH", CLASSES[2][2]),
                ("ventricles_icv_fraction", "ventricles", CLASSES[1][2])]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (col, name, color) in zip(axes, measures):
        vals = 100 * pd.to_numeric(df[col], errors="coerce").dropna()
        ax.boxplot(vals, widths=0.5)
        ax.scatter(np.random.default_rng(0).normal(1, 0.04, len(vals)), vals, s=8, color=color,
                   edgecolor="k", linewidth=0.3)
        ax.set_title(name)
        ax.set_ylabel("% of ICV")
        ax.set_xticks([])
    fig.tight_layout()
    out.append({"id": "distributions", "caption": "Burden normalised by intracranial volume (every FLAIR).",
                "png": _png(fig)})
    if "age" in df and pd.to_numeric(df["age"], errors="coerce").notna().any():
        key = "group" if "group" in df and df["group"].nunique() > 1 else "sex" if "sex" in df else None
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
        age = pd.to_numeric(df["age"], errors="coerce")
        for ax, (col, name, _c) in zip(axes, measures):
            y = 100 * pd.to_numeric(df[col], errors="coerce")
            if key:
                for lv, g in df.groupby(key):
                    ax.scatter(age[g.index], y[g.index], s=10, label=str(lv))
                ax.legend(fontsize=7, title=key, title_fontsize=7)
            else:
                ax.scatter(age, y, s=10)
            ax.set_xlabel("age (years)")
            ax.set_ylabel(f"{name}, % ICV")
        fig.tight_layout()
        out.append({"id": "age", "caption": f"Burden vs age, coloured by {key or 'nothing'}.", "png": _png(fig)})
    shares = df[["lesion_periventricular_ml", "lesion_juxtacortical_ml", "lesion_deep_ml"]].apply(
        pd.to_numeric, errors="coerce").sum()
    if shares.sum() > 0:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(["periventricular", "juxtacortical", "deep"], 100 * shares / shares.sum(),
               color=["#c0392b", "#e67e22", "#8e44ad"])
        ax.set_ylabel("% of lesion volume")
        fig.tight_layout()
        out.append({"id": "locations", "caption": "Lesion volume by location (all FLAIRs pooled).",
                    "png": _png(fig)})
    multi = df[df["session_id"] != "n/a"].groupby("participant_id").filter(lambda g: g["session_id"].nunique() > 1)
    if len(multi):
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
        for ax, (col, name, _c) in zip(axes, [("abnormal_wmh_ml", "abnormal WMH", ""),
                                              ("normal_wmh_ml", "normal WMH", ""), ("ventricles_ml", "ventricles", "")]):
            for sub, g in multi.groupby("participant_id"):
                g = g.sort_values("session_id")
                ax.plot(g["session_id"], g[col], marker="o", label=sub)
            ax.set_title(name)
            ax.set_ylabel("mL")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        out.append({"id": "longitudinal", "caption": "Per-participant trajectories across sessions.",
                    "png": _png(fig)})
    return out


def write_group_report(path: Path, df: pd.DataFrame, tests: pd.DataFrame, bands: pd.DataFrame,
                       long: pd.DataFrame, qc: pd.DataFrame) -> Path:
    """Render ``group.html`` (autoescaped)."""
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    rows = []
    for _, r in df.iterrows():
        rows.append({"report": r["report"], "cells": [r[c] for c in cols]})
    html = _env().get_template("group.html.j2").render(
        version=__version__, n_flairs=len(df), n_participants=df["participant_id"].nunique(),
        columns=cols, rows=rows, figures=figures(df, long),
        tests=tests.to_dict(orient="records"), bands=bands.to_dict(orient="records"),
        long=long.to_dict(orient="records"), qc=qc.to_dict(orient="records"))
    return atomic_write_text(path, html)
