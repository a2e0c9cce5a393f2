"""Self-contained HTML reports (participant and group).

Shared helpers: the jinja2 environment (autoescaping every template), the strict
Content-Security-Policy with sha256 hash sources of the inline scripts, PNG encoding.
"""
from __future__ import annotations

import base64
import hashlib
import io
import re

#: placeholder the templates put in their CSP meta tag; replaced by :func:`finalize_csp`
CSP_SCRIPT_PLACEHOLDER = "__MS3SEG_CSP_SCRIPT_SRC__"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def class_infos(classes=None) -> tuple:
    """The class table a report draws: ``classes`` (ClassInfo of the card or of the run's
    ``desc-trimask_dseg.tsv``), or the MS3SEG tri-mask (``ms3seg_app.CLASSES``)."""
    from .. import CLASSES
    from ..model.card import ClassInfo

    return tuple(classes) if classes is not None else tuple(ClassInfo(i, *v) for i, v in CLASSES.items())


def class_colors(classes=None) -> dict:
    """Abbreviation -> ``#rrggbb``: the colours of ``classes``, the MS3SEG tri-mask's for a
    class they do not name."""
    return {c.abbreviation: c.color for c in class_infos() + class_infos(classes)}


def env():
    """The jinja2 environment of the report templates (autoescape on for every template)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(loader=PackageLoader("ms3seg_app", "data/templates"),
                       autoescape=select_autoescape(["html", "j2"], default=True),
                       trim_blocks=True, lstrip_blocks=True)


def script_hash(js: str) -> str:
    """CSP hash source (``'sha256-<base64>'``) of an inline script's exact text (UTF-8)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii") + "'"


def finalize_csp(html: str) -> str:
    """Replace the CSP placeholder by the hash sources of every inline ``<script>`` of ``html``.

    Only ``<script>`` elements without attributes are executable inline scripts in our
    templates (data blocks use ``type="application/octet-stream"``, which browsers never
    run). Hashing the rendered text means the policy always matches what is in the file,
    and no ``'unsafe-inline'`` is needed. Text from the dataset is autoescaped, so it can
    never form a ``<script>`` element. Without any inline script, ``script-src 'none'``.
    """
    hashes = sorted({script_hash(m.group(1)) for m in _INLINE_SCRIPT.finditer(html)})
    return html.replace(CSP_SCRIPT_PLACEHOLDER, " ".join(hashes) or "'none'", 1)


def png_base64(fig, dpi: int = 80) -> str:
    """Save a matplotlib figure as PNG, close it, return the base64 text."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def format_value(v, digits: int = 3, percent: bool = False, plain_below: float = 1e4) -> str:
    """A table cell: ``n/a`` for missing/NaN, yes/no, integers as they are, floats to
    ``digits`` significant digits (times 100 with ``percent``), large floats without decimals."""
    import numpy as np

    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        x = 100 * float(v) if percent else float(v)
        return f"{x:.{digits}g}" if percent or abs(x) < plain_below else f"{x:.0f}"
    return str(v)
