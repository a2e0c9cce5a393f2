"""Participant HTML report: self-contained (images embedded), jinja2 with autoescape."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from .. import CLASSES, __version__
from ..derivatives import atomic_write_text


def _env():
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(loader=PackageLoader("ms3seg_app", "data/templates"),
                       autoescape=select_autoescape(["html", "j2"], default=True))


def overlay_pngs(img, dseg: np.ndarray, max_slices: int = 40) -> list[dict]:
    """PNG overlays (FLAIR | FLAIR + tri-mask in MS3SEG colours) of every axial slice with findings.

    Slices are shown in radiological convention (patient right on the image left,
    anterior up), after reorientation to RAS+.

    Returns
    -------
    list of dict(index, png base64 str)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    import nibabel as nib

    ornt = nib.orientations.io_orientation(img.affine)
    f = nib.orientations.apply_orientation(np.asarray(img.dataobj, np.float32), ornt)
    d = nib.orientations.apply_orientation(dseg, ornt)
    hi = float(np.percentile(f, 99.5)) or 1.0
    cmap = ListedColormap([CLASSES[i][2] for i in range(4)])
    ks = [k for k in range(d.shape[2]) if (d[:, :, k] > 0).any()][:max_slices]
    out = []
    for k in ks:
        sl = np.rot90(f[:, :, k])[:, ::-1]  # RAS -> radiological display
        lb = np.rot90(d[:, :, k])[:, ::-1]
        fig, ax = plt.subplots(1, 2, figsize=(6, 3), dpi=80)
        for a in ax:
            a.imshow(sl, cmap="gray", vmin=0, vmax=hi)
            a.axis("off")
        ax[1].imshow(np.ma.masked_where(lb == 0, lb), cmap=cmap, vmin=0, vmax=3, alpha=0.55,
                     interpolation="nearest")
        fig.suptitle(f"axial slice {k}", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append({"index": k, "png": base64.b64encode(buf.getvalue()).decode("ascii")})
    return out


def write_participant_report(path: Path, fi, img, dseg, lesions, volumes: dict, warnings: list[str],
                             model_info: dict, metadata: dict) -> Path:
    """Write ``sub-<L>[...].html`` (all text from the dataset is escaped by jinja2)."""
    html = _env().get_template("participant.html.j2").render(
        title=fi.prefix, version=__version__, flair=fi.path.name,
        classes=[{"index": i, "name": n, "abbr": a, "color": c} for i, (n, a, c) in CLASSES.items()],
        volumes=volumes, lesions=lesions.to_dict(orient="records"), warnings=warnings,
        model=model_info, metadata=metadata, slices=overlay_pngs(img, dseg))
    return atomic_write_text(path, html)
