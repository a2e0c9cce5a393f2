"""Group HTML report: burden tables, distributions, burden vs age, locations, change, stats, QC.

Self-contained (figures embedded as PNG data URIs, inline CSS, one inline script for
sorting allowed by its sha256 hash in the Content-Security-Policy: no library is loaded,
so it works offline) and rendered with jinja2 autoescaping. Every participant report
(``<prefix>.html`` in the same folder) is linked.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import __version__
from ..bids import label_sort_key
from ..derivatives import atomic_write_text
from . import CSP_SCRIPT_PLACEHOLDER, class_colors, env, finalize_csp, format_value, png_base64

#: below this many points a distribution is shown as the points only (no box plot)
MIN_BOX = 5
#: above this many FLAIRs the location figure shows distributions instead of one bar per FLAIR
MAX_BARS = 40
ID_COLUMNS = ["participant_id", "session_id", "acq", "run"]
#: table id -> (title, unit, columns); one unit per table. Header text stays the TSV column name.
TABLES = {
    "burden": ("Volumes per FLAIR", "mL", ["abnormal_wmh_ml", "normal_wmh_ml", "ventricles_ml", "icv_ml"]),
    "icv": ("Volumes per FLAIR as a fraction of the intracranial volume", "% of ICV",
            ["abnormal_wmh_icv_fraction", "normal_wmh_icv_fraction", "ventricles_icv_fraction"]),
    "counts": ("Lesions per FLAIR", "count", ["lesion_count", "lesion_periventricular_count",
                                             "lesion_juxtacortical_count", "lesion_deep_count"]),
    "shares": ("Lesion volume by location, per FLAIR", "% of the FLAIR's lesion volume",
               ["lesion_periventricular_share", "lesion_juxtacortical_share", "lesion_deep_share"]),
}
LABELS = {
    "participant_id": "Participant", "session_id": "Session", "acq": "Acquisition", "run": "Run",
    "abnormal_wmh_ml": "Abnormal WMH", "normal_wmh_ml": "Normal WMH", "ventricles_ml": "Ventricles",
    "icv_ml": "Intracranial volume", "abnormal_wmh_icv_fraction": "Abnormal WMH",
    "normal_wmh_icv_fraction": "Normal WMH", "ventricles_icv_fraction": "Ventricles",
    "lesion_count": "All lesions", "lesion_periventricular_count": "Periventricular",
    "lesion_juxtacortical_count": "Juxtacortical", "lesion_deep_count": "Deep",
    "lesion_periventricular_share": "Periventricular", "lesion_juxtacortical_share": "Juxtacortical",
    "lesion_deep_share": "Deep", "age": "Age (years)", "sex": "Sex", "group": "Group", "qc_flags": "QC flags",
}
PERCENT = {"icv", "shares"}
LOC_COLORS = {"periventricular": "#c0392b", "juxtacortical": "#e67e22", "deep": "#8e44ad"}
#: Burden columns plotted, their titles and the abbreviation of the class whose colour they take.
MEASURES = [("abnormal_wmh_icv_fraction", "Abnormal WMH", "AWMH"),
            ("normal_wmh_icv_fraction", "Normal WMH", "NWMH"),
            ("ventricles_icv_fraction", "Ventricles", "VEN")]
# kept for importers of the old name
TABLE_COLUMNS = ID_COLUMNS + TABLES["burden"][2] + ["lesion_count", "lesion_periventricular_share", "age", "sex",
                                                     "group", "qc_flags"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r) -> str:
    ses = r.get("session_id", "n/a")
    return str(r["participant_id"]) + ("" if ses in ("n/a", None) or pd.isna(ses) else f" {ses}")


def _measure_colors(classes=None) -> list[str]:
    """Colour of each :data:`MEASURES` plot: its class's in ``classes`` (the run's class
    table), else the MS3SEG tri-mask's (also for a class the table lacks)."""
    color = class_colors(classes)
    return [color[abbr] for _, _, abbr in MEASURES]


def figures(df: pd.DataFrame, long: pd.DataFrame, classes=None) -> list[dict]:
    """Group figures as PNG (base64) with captions.

    Parameters
    ----------
    df : DataFrame
        One row per FLAIR (``group_desc-trimask_volumes.tsv``).
    long : DataFrame
        Longitudinal changes (unused for the figures beyond the trajectories).
    classes : sequence of ClassInfo, optional
        The run's class table (:func:`ms3seg_app.derivatives.read_class_table`): colours
        of the burden plots (default: the MS3SEG tri-mask's).

    Returns
    -------
    list of dict(id, caption, png)
    """
    plt = _plt()
    out = []
    rng = np.random.default_rng(0)
    n = len(df)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (col, name, _), color in zip(axes, MEASURES, _measure_colors(classes)):
        vals = 100 * pd.to_numeric(df.get(col), errors="coerce").dropna()
        if len(vals) >= MIN_BOX:
            ax.boxplot(vals, widths=0.5, showfliers=False)
        ax.scatter(1 + rng.uniform(-0.12, 0.12, len(vals)), vals, s=22, color=color, edgecolor="k",
                   linewidth=0.5, zorder=3)
        ax.set_title(name)
        ax.set_ylabel("% of ICV")
        ax.set_xticks([])
        ax.set_xlim(0.5, 1.5)
        ax.set_ylim(bottom=0, top=max(float(vals.max()) * 1.15 if len(vals) else 1, 1e-3))
    fig.tight_layout()
    how = "points (one per FLAIR) with box plots (median, quartiles, 1.5 IQR whiskers)" if n >= MIN_BOX \
        else f"one point per FLAIR (no box plot below {MIN_BOX} FLAIRs)"
    out.append({"id": "distributions", "caption": f"Burden as % of intracranial volume: {how}. Axes start at 0.",
                "png": png_base64(fig)})

    age = pd.to_numeric(df["age"], errors="coerce") if "age" in df else None
    if age is not None and age.notna().any():
        key = "group" if "group" in df and df["group"].nunique() > 1 else \
            "sex" if "sex" in df and df["sex"].nunique() > 1 else None
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        for ax, (col, name, _c) in zip(axes, MEASURES):
            y = 100 * pd.to_numeric(df[col], errors="coerce")
            if key:
                for lv, g in df.groupby(key):
                    ax.scatter(age[g.index], y[g.index], s=18, label=str(lv))
            else:
                ax.scatter(age, y, s=18, color="#333")
            ax.set_xlabel("Age (years)")
            ax.set_ylabel("% of ICV")
            ax.set_title(name)
            ax.set_ylim(bottom=0, top=max(float(np.nanmax(y)) * 1.15 if y.notna().any() else 1, 1e-3))
        if key:
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, [lb[:30] for lb in labels], title=key.capitalize(), loc="center left",
                       bbox_to_anchor=(0.86, 0.5), fontsize=8, title_fontsize=8, frameon=False)
            fig.tight_layout(rect=(0, 0, 0.85, 1))
        else:
            fig.tight_layout()
        out.append({"id": "age", "caption": "Burden vs age (% of ICV, from 0), one point per FLAIR"
                    + (f", coloured by {key}." if key else "."), "png": png_base64(fig)})

    locs = [f"lesion_{loc}_ml" for loc in LOC_COLORS]
    if all(c in df for c in locs):
        vol = df[locs].apply(pd.to_numeric, errors="coerce").fillna(0)
        tot = vol.sum(axis=1)
        share = 100 * vol.div(tot.where(tot > 0), axis=0)
        if (tot > 0).any() and n <= MAX_BARS:
            labels = [_label(r) for _, r in df.iterrows()]
            fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.28 * n))
            left = np.zeros(n)
            for c, (loc, color) in zip(locs, LOC_COLORS.items()):
                v = share[c].fillna(0).to_numpy()
                ax.barh(np.arange(n), v, left=left, color=color, label=loc, height=0.7)
                left += v
            ax.set_yticks(np.arange(n), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_xlabel("% of the FLAIR's lesion volume")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
            fig.tight_layout()
            out.append({"id": "locations", "caption": "Lesion volume by location, one bar per FLAIR "
                        "(participant and session; never pooled). Empty bars: no lesion.", "png": png_base64(fig)})
        elif (tot > 0).any():
            fig, ax = plt.subplots(figsize=(6, 3.2))
            for x, (c, (loc, color)) in enumerate(zip(locs, LOC_COLORS.items()), start=1):
                v = share[c].dropna()
                ax.boxplot(v, positions=[x], widths=0.5, showfliers=False)
                ax.scatter(x + rng.uniform(-0.15, 0.15, len(v)), v, s=6, color=color, alpha=0.6, zorder=3)
            ax.set_xticks([1, 2, 3], list(LOC_COLORS))
            ax.set_ylim(0, 100)
            ax.set_ylabel("% of the FLAIR's lesion volume")
            fig.tight_layout()
            out.append({"id": "locations", "caption": "Share of each FLAIR's lesion volume by location "
                        "(one point per FLAIR with lesions; computed per FLAIR, not pooled).",
                        "png": png_base64(fig)})

    multi = df[df["session_id"] != "n/a"].groupby("participant_id").filter(lambda g: g["session_id"].nunique() > 1)
    if len(multi):
        if "session_order" in multi and (multi["session_order"] == "acq_time").any():
            # some participants' sessions are in acquisition order (group.order_sessions): each
            # session at its rank; a tick names the session where all participants agree on it
            x = multi["session_rank"]
            order = []
            for r in range(int(x.max()) + 1):
                labels = multi.loc[x == r, "session_id"].unique()
                order.append(labels[0] if len(labels) == 1 else f"#{r + 1}")
        else:
            # sessions at their places in the labels' numeric order (a categorical axis would
            # take them in the order they first appear over the participants)
            order = multi["session_id"].drop_duplicates().sort_values(key=label_sort_key).tolist()
            x = multi["session_id"].map({s: i for i, s in enumerate(order)})
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        for ax, (col, name) in zip(axes, [("abnormal_wmh_ml", "Abnormal WMH"), ("normal_wmh_ml", "Normal WMH"),
                                          ("ventricles_ml", "Ventricles")]):
            for sub, g in multi.assign(x=x).groupby("participant_id"):
                g = g.sort_values("x", kind="stable")
                ax.plot(g["x"], g[col], marker="o", label=sub)
            ax.set_xticks(range(len(order)), order, rotation=45 if len(order) > 6 else 0)
            ax.set_title(name)
            ax.set_ylabel("mL")
            ax.set_ylim(bottom=0)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels[:20], loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=8,
                   frameon=False, title="Participant", title_fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.85, 1))
        out.append({"id": "longitudinal", "caption": "Per-participant trajectories across sessions (mL, from 0).",
                    "png": png_base64(fig)})
    return out


def _cell(v, percent: bool = False):
    return format_value(v, 3 if percent else 4, percent, plain_below=1e5)


def tables(df: pd.DataFrame) -> list[dict]:
    """The per-FLAIR tables, one unit each (see :data:`TABLES`), as formatted cells.

    Returns
    -------
    list of dict(id, title, unit, columns (list of dict(name, label)), rows (list of dict(report,
    cells)), n_id (number of identifier columns)).
    """
    ids = [c for c in ID_COLUMNS if c in df and not (c in ("acq", "run") and (df[c] == "n/a").all())]
    out = []
    for tid, (title, unit, cols) in TABLES.items():
        cols = [c for c in cols if c in df]
        if not cols:
            continue
        extra = [c for c in ("age", "sex", "group", "qc_flags") if c in df] if tid == "burden" else []
        allc = ids + cols + extra
        rows = [{"report": r.get("report") or "", "cells": [_cell(r[c], tid in PERCENT and c in cols)
                                                            for c in allc]} for _, r in df.iterrows()]
        out.append({"id": tid, "title": title, "unit": unit, "short": "%" if "%" in unit else unit,
                    "n_id": len(ids), "n_val": len(cols),
                    "columns": [{"name": c, "label": LABELS.get(c, c)} for c in allc], "rows": rows})
    return out


def band_tables(bands: pd.DataFrame) -> list[dict]:
    """Age-band table transposed to fit a page: rows = measures, columns = bands, "median (Q1-Q3)".

    Two tables, one unit each: mL and % of ICV (ICV fractions x 100).
    """
    if bands is None or not len(bands) or "age_band" not in bands:
        return []
    heads = [f"{b} (n={int(n)})" for b, n in zip(bands["age_band"], bands["n"])]
    out = []
    for tid, unit, measures, scale in (("agebands-ml", "mL", ["abnormal_wmh_ml", "normal_wmh_ml", "ventricles_ml"], 1),
                                       ("agebands-icv", "% of ICV", [m for m, _n, _c in MEASURES], 100)):
        rows = []
        for m in measures:
            if f"{m}_median" not in bands:
                continue
            cells = [f"{scale * r[f'{m}_median']:.3g} ({scale * r[f'{m}_q1']:.3g}–{scale * r[f'{m}_q3']:.3g})"
                     if pd.notna(r[f"{m}_median"]) else "n/a" for _, r in bands.iterrows()]
            rows.append({"label": LABELS.get(m, m), "cells": cells})
        if rows:
            out.append({"id": tid, "unit": unit, "heads": heads, "rows": rows})
    if "periventricular_share_median" in bands:
        out.append({"id": "agebands-share", "unit": "% of lesion volume", "heads": heads,
                    "rows": [{"label": "Periventricular share",
                              "cells": [f"{100 * v:.3g}" if pd.notna(v) else "n/a"
                                        for v in bands["periventricular_share_median"]]}]})
    return out


LONG_LABELS = {"participant_id": "Participant", "session_from": "From session", "session_to": "To session",
               "delta_abnormal_wmh_ml": "Δ abnormal WMH", "delta_normal_wmh_ml": "Δ normal WMH",
               "delta_ventricles_ml": "Δ ventricles", "new_lesion_volume_mm3": "New lesion volume",
               "n_new_lesions": "New lesions", "n_enlarging_lesions": "Enlarging lesions",
               "registration": "Registration"}


def long_tables(long: pd.DataFrame) -> list[dict]:
    """Longitudinal change as two tables, one unit each: volume change (mL) and lesion counts."""
    if long is None or not len(long):
        return []
    long = long.copy()
    ids = [c for c in ("participant_id", "session_from", "session_to") if c in long]
    ml = [c for c in long.columns if c.startswith("delta_")]
    if "new_lesion_volume_mm3" in long:
        long["new_lesion_volume_ml"] = pd.to_numeric(long["new_lesion_volume_mm3"], errors="coerce") / 1000
        ml.append("new_lesion_volume_ml")
    counts = [c for c in ("n_new_lesions", "n_enlarging_lesions") if c in long]
    out = []
    for tid, title, unit, cols, tail in (("long-ml", "Volume change", "mL", ml, ["registration"]),
                                         ("long-n", "New and enlarging lesions", "count", counts, [])):
        cols = [c for c in cols if c in long]
        tail = [c for c in tail if c in long]
        if not cols:
            continue
        labels = {**LONG_LABELS, "new_lesion_volume_ml": "New lesion volume"}
        out.append({"id": tid, "title": title, "unit": unit, "n_id": len(ids), "n_val": len(cols),
                    "columns": [{"name": c if c != "new_lesion_volume_ml" else "new_lesion_volume_mm3 / 1000",
                                 "label": labels.get(c, c) + (f" ({unit})" if c in cols and unit != "count" else "")}
                                for c in ids + cols + tail],
                    "rows": [[_cell(r[c]) if not (c in counts and pd.notna(r[c])) else str(int(r[c]))
                              for c in ids + cols + tail] for _, r in long.iterrows()]})
    return out


def write_group_report(path, df: pd.DataFrame, tests: pd.DataFrame, bands: pd.DataFrame,
                       long: pd.DataFrame, qc: pd.DataFrame, *, title: str = "ms3seg-app group report",
                       classes=None):
    """Render ``group.html`` (autoescaped, self-contained).

    Parameters
    ----------
    path : Path
        Output file, in the folder of the participant reports (links are relative).
    df : DataFrame
        One row per FLAIR (see :func:`ms3seg_app.group.collect_volumes`): identifiers,
        volumes (mL), ICV fractions (0-1), lesion counts and location shares (0-1),
        ``report`` (participant report file name, empty if absent), covariates, ``qc_flags``.
    tests, bands, long, qc : DataFrame
        Statistics, age bands, longitudinal change and QC entries of :mod:`ms3seg_app.group`.
    title : str, optional
        Page title.
    classes : sequence of ClassInfo, optional
        The run's class table: colours of the burden plots (see :func:`figures`).

    Returns
    -------
    Path
        ``path``.
    """
    long = long if long is not None else pd.DataFrame()
    html = env().get_template("group.html.j2").render(
        csp_script_src=CSP_SCRIPT_PLACEHOLDER, title=title,
        version=__version__, n_flairs=len(df), n_participants=df["participant_id"].nunique(),
        tables=tables(df), figures=figures(df, long, classes),
        tests=[{**t, "measure": LABELS.get(t["measure"], t["measure"]),
                "unit": "% of ICV" if str(t["measure"]).endswith("fraction") else "mL"}
               for t in tests.to_dict(orient="records")],
        bands=band_tables(bands),
        long=long_tables(long),
        qc=qc.to_dict(orient="records"),
        links=[{"label": _label(r), "href": r["report"]} for _, r in df.iterrows() if r.get("report")])
    return atomic_write_text(path, finalize_csp(html))
