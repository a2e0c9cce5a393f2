"""Participant and group HTML reports: content, escaping, CSP, self-containedness, Chromium."""
import html as htmlmod
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from browser import ARTIFACTS, check_page, full_screenshot
from ms3seg_app.reports import finalize_csp, script_hash
from ms3seg_app.reports.group import write_group_report
from ms3seg_app.reports.individual import LESION_COLUMNS, methods_text, write_participant_report

EVIL = "<script>alert(1)</script>"
LESION_COLS = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
               "mean_probability", "uncertainty", "dist_ventricles_mm", "dist_brain_surface_mm", "location"]


def synthetic(shape=(64, 64, 12), zooms=(1.0, 1.0, 3.0), lps=True, seed=0):
    """A FLAIR-like phantom (head ellipsoid, ventricle block, lesion blobs) with its tri-mask.

    Stored LPS (x and y flipped) by default, to check the reports reorient to RAS+.
    """
    rng = np.random.default_rng(seed)
    ni, nj, nk = shape
    x, y, z = np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij")
    cx, cy, cz = ni / 2, nj / 2, nk / 2
    head = ((x - cx) / (0.42 * ni)) ** 2 + ((y - cy) / (0.46 * nj)) ** 2 + ((z - cz) / (0.6 * nk)) ** 2 < 1
    brain = ((x - cx) / (0.36 * ni)) ** 2 + ((y - cy) / (0.40 * nj)) ** 2 + ((z - cz) / (0.55 * nk)) ** 2 < 1
    flair = np.where(head, 250.0, 0.0) + np.where(brain, 150.0, 0.0)
    dseg = np.zeros(shape, np.uint8)
    vent = (abs(x - cx) < ni / 14) & (abs(y - cy) < nj / 7) & (abs(z - cz) < nk / 4)
    dseg[vent], flair[vent] = 1, 60
    cap = (abs(x - cx) < ni / 12) & (abs(y - cy - nj / 7 - 1.5) < 1.5) & (abs(z - cz) < nk / 4)
    dseg[cap], flair[cap] = 2, 480
    centres = [(cx - ni * 0.2, cy + nj * 0.1, cz), (cx + ni * 0.22, cy - nj * 0.15, cz + 1),
               (cx + ni * 0.05, cy + nj * 0.3, cz - 2)]
    vox = []
    for (a, b, c) in centres:
        blob = ((x - a) ** 2 + (y - b) ** 2 < 9) & (abs(z - c) <= 1)
        dseg[blob], flair[blob] = 3, 600
        vox.append(int(blob.sum()))
    flair = (flair + rng.normal(0, 8, shape) * head).astype(np.float32)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-ni * zooms[0] / 2, -nj * zooms[1] / 2, -nk * zooms[2] / 2]
    if lps:  # storage i -> patient left->right reversed, j -> anterior->posterior
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [ni - 1, nj - 1]
        affine = affine @ flip
        flair, dseg, brain = flair[::-1, ::-1], dseg[::-1, ::-1], brain[::-1, ::-1]
        # the phantom's anatomy is the same; only the storage order changed
    img = nib.Nifti1Image(np.ascontiguousarray(flair), affine)
    t1 = nib.Nifti1Image(np.ascontiguousarray(np.where(dseg == 1, 30.0, np.where(brain, 400.0, 0.0))
                                              .astype(np.float32) + np.where(flair > 200, 100, 0)), affine)
    lesions = []
    lab = dseg == 3
    from scipy import ndimage

    comp, n = ndimage.label(lab, structure=np.ones((3, 3, 3)))
    for lid in range(1, n + 1):
        ijk = np.argwhere(comp == lid).mean(0)
        xyz = nib.affines.apply_affine(affine, ijk)
        nv = int((comp == lid).sum())
        lesions.append({"lesion_id": lid, "n_voxels": nv, "volume_mm3": nv * float(np.prod(zooms)),
                        "centroid_x_mm": xyz[0], "centroid_y_mm": xyz[1], "centroid_z_mm": xyz[2],
                        "mean_probability": 0.8 + 0.05 * lid, "uncertainty": 0.1 * lid,
                        "dist_ventricles_mm": 3.0 * lid, "dist_brain_surface_mm": 10.0 / lid,
                        "location": ["periventricular", "juxtacortical", "deep"][(lid - 1) % 3]})
    lesions = pd.DataFrame(lesions, columns=LESION_COLS)
    vml = float(np.prod(zooms)) / 1000
    icv = float(brain.sum()) * vml
    volumes = {"ventricles_ml": (dseg == 1).sum() * vml, "normal_wmh_ml": (dseg == 2).sum() * vml,
               "abnormal_wmh_ml": (dseg == 3).sum() * vml, "lesion_count": int(n), "icv_ml": icv}
    for k in ("ventricles", "normal_wmh", "abnormal_wmh"):
        volumes[f"{k}_icv_fraction"] = volumes[f"{k}_ml"] / icv
    for loc in ("periventricular", "juxtacortical", "deep"):
        sel = lesions[lesions["location"] == loc]
        volumes[f"lesion_{loc}_ml"] = float(sel["volume_mm3"].sum()) / 1000
        volumes[f"lesion_{loc}_count"] = len(sel)
        volumes[f"lesion_{loc}_share"] = float(sel["volume_mm3"].sum()) / max(1e-9, lesions["volume_mm3"].sum())
    return {"flair": img, "dseg": dseg, "brain_mask": brain, "coreg": {"T1w": t1}, "lesions": lesions,
            "volumes": volumes}


PROVENANCE = {
    "ms3seg_app_version": "9.8.7", "model_name": "ms3seg_app_unet16", "model_sha256": "ab" * 32,
    "ensemble_members": 5, "tta": True, "skull_stripping": "deepbet", "n4": True,
    "coregistration": {"T1w": "antspy-rigid"},
    "software": {"tensorflow": "2.17.1", "nipype": "1.8.6", "pybids": "0.16.5", "antspyx": "0.5.4",
                 "deepbet": "1.0.2"},
    "cross_validation": {"abnormal WMH": {"n_subjects": 11, "dice": 0.71, "hd95_mm": 6.2, "lesion_f1": 0.66},
                         "ventricles": {"dice": 0.9}},
    "lesion_definition": {"connectivity": 26, "min_volume_mm3": 5.0},
    "run_date": "2026-11-23T05:00:00",
}


def render(tmp_path, name="sub-01_ses-01.html", **over):
    s = synthetic(**over.pop("geometry", {}))
    kw = dict(title=f"sub-01_ses-01 {EVIL}", flair_name="sub-01_ses-01_FLAIR.nii.gz", flair=s["flair"],
              dseg=s["dseg"], brain_mask=s["brain_mask"], coreg=s["coreg"], lesions=s["lesions"],
              volumes=s["volumes"], warnings=["FLAIR slice thickness 6 mm & odd <b>orientation</b>"],
              provenance=PROVENANCE, metadata={"Manufacturer": EVIL, "EchoTime": 0.12})
    kw.update(over)
    t0 = time.perf_counter()
    out = write_participant_report(tmp_path / name, **kw)
    return out, time.perf_counter() - t0


def csp_of(text):
    m = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text)
    assert m, "no CSP meta tag"
    return dict((d.split()[0], d.split()[1:]) for d in m.group(1).split(";") if d.strip())


def assert_self_contained(text):
    # no element may load anything from outside the file
    assert not re.search(r'\s(src|href|action|poster|data)\s*=\s*"(?!data:|#|[\w.-]+\.html)', text), \
        re.search(r'\s(src|href|action|poster|data)\s*=\s*"(?!data:|#|[\w.-]+\.html)[^"]*"', text).group(0)
    assert "<link" not in text and "@import" not in text and "url(http" not in text
    csp = csp_of(text)
    assert csp["default-src"] == ["'none'"]
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert all(s.startswith("'sha256-") for s in csp["script-src"]), csp["script-src"]
    scripts = re.findall(r"<script>(.*?)</script>", text, re.S)
    assert scripts and sorted(csp["script-src"]) == sorted({script_hash(s) for s in scripts})
    assert "connect-src" not in csp  # falls back to 'none': no fetch/XHR/WebSocket


def test_participant_report_content(tmp_path):
    out, seconds = render(tmp_path)
    text = out.read_text()
    print(f"participant report 64x64x12: {seconds:.2f} s, {out.stat().st_size / 1e6:.2f} MB")
    assert_self_contained(text)
    # dataset text is escaped, never markup
    assert EVIL not in text and htmlmod.escape(EVIL, quote=False) in text
    assert "<b>orientation</b>" not in text and "&lt;b&gt;orientation&lt;/b&gt;" in text
    # QC warnings at the top, before the headline
    assert text.index('id="qc-warnings"') < text.index('id="headline"')
    assert "1 QC warning:" in text
    # human column names with units, lesion ids and their slice
    for col in ("Volume (mm³)", "Distance to ventricles (mm)", "Distance to brain surface (mm)",
                "Uncertainty", "Axial slice", "Mean probability"):
        assert f">{col}</th>" in text, col
    assert "dist_ventricles_mm</th>" not in text
    table = text[text.index('id="lesion-table"'):text.index("</table>", text.index('id="lesion-table"'))]
    assert [int(v) for v in re.findall(r'<tr><td class="l">(\d+)</td>', table)] == [1, 2, 3]
    # key figures in mL and % of ICV, lesion count by location
    assert "Volume (mL)" in text and "% of ICV" in text and "Periventricular" in text
    assert "3 lesion(s)" in text
    # the figures of the checks and the headline
    for fid in ("fig-headline", "fig-brainmask", "fig-findings"):
        assert f'id="{fid}"' in text, fid
    assert "Co-registration of the T1w (antspy-rigid)" in text
    # Methods: versions, model, validation, references, chosen skull stripping
    methods = text[text.index('id="methods"'):text.index('id="about"')]
    for s in ("ms3seg-app 9.8.7", "TensorFlow 2.17.1", "Nipype 1.8.6", "PyBIDS 0.16.5", "deepbet 1.0.2",
              "ensemble of 5 networks", "abnormal WMH (n = 11 subjects): Dice 0.71", "HD95 (mm) 6.2", "26-connected", "5 mm³",
              "Bashiri Bawil", "Scientific Data, 2025", "Fisch L", "Avants BB", "Gorgolewski K",
              "Yarkoni T", "TensorFlow", "2026-11-23"):
        assert s in methods, s
    assert "Smith SM" not in methods
    # back link to the group report, viewer payload embedded
    assert 'href="group.html"' in text
    assert 'id="viewer-flair"' in text and 'id="viewer-dseg"' in text


def test_methods_follow_provenance():
    m = methods_text({**PROVENANCE, "skull_stripping": "fsl-bet", "n4": False, "ensemble_members": 1,
                      "tta": False, "cross_validation": {}, "coregistration": {}})
    text = " ".join(m["paragraphs"] + m["references"])
    assert "FSL BET" in text and "Smith SM" in text and "Fisch L" not in text
    assert "N4" not in text and "single network" in text and "without test-time" in text
    assert "No cross-validation figures" in text
    refs = " ".join(m["references"])
    assert "Avants" not in refs  # nothing ran with ANTs
    numbers = [int(n) for n in re.findall(r"\[(\d+)\]", " ".join(m["paragraphs"]))]
    assert set(numbers) == set(range(1, len(m["references"]) + 1))


def test_csp_hash_matches_and_no_script_gives_none():
    html = '<meta content="script-src __MS3SEG_CSP_SCRIPT_SRC__"><script>var a = 1;</script>'
    assert script_hash("var a = 1;") in finalize_csp(html)
    assert "script-src 'none'" in finalize_csp('<meta content="script-src __MS3SEG_CSP_SCRIPT_SRC__">')


def test_participant_report_without_lesions_or_coreg(tmp_path):
    s = synthetic(lps=False)
    dseg = np.where(s["dseg"] == 3, 0, s["dseg"]).astype(np.uint8)
    out, _ = render(tmp_path, dseg=dseg, lesions=pd.DataFrame(columns=LESION_COLS), coreg={}, warnings=[])
    text = out.read_text()
    assert "No lesion found." in text and "No abnormal WMH was segmented." in text
    assert "No automatic QC check failed" in text
    assert "No T1w/T2w was co-registered" in text
    assert_self_contained(text)


def test_lesion_ids_land_on_their_slice(tmp_path):
    from ms3seg_app.reports.individual import _reorient, lesion_rows

    s = synthetic(lps=True)
    can, (d,) = _reorient(s["flair"], s["dseg"])
    cols, rows, marks = lesion_rows(s["lesions"], can.affine)
    assert cols[:2] == [LESION_COLUMNS["lesion_id"], LESION_COLUMNS["slice"]]
    for k, items in marks.items():
        for i, j, lid in items:  # the mark sits on the lesion in the RAS+ arrays the figures show
            assert d[int(round(i)), int(round(j)), k] == 3, (lid, i, j, k)


def test_lesion_ids_on_every_slice_of_the_lesion():
    from ms3seg_app.reports.individual import _reorient, slice_marks

    s = synthetic(lps=True)
    can, (d,) = _reorient(s["flair"], s["dseg"])
    marks = slice_marks(d, s["lesions"], can.affine)
    seen = {}
    for k, items in marks.items():
        for i, j, lid in items:
            assert d[int(round(i)), int(round(j)), k] == 3, (lid, i, j, k)
            seen.setdefault(lid, set()).add(k)
    # each phantom lesion spans 3 slices: its id is on all three
    assert {lid: len(ks) for lid, ks in seen.items()} == {"1": 3, "2": 3, "3": 3}


def test_participant_report_speed_and_size(tmp_path):
    out, seconds = render(tmp_path, geometry={"shape": (256, 256, 20), "zooms": (0.9, 0.9, 6.0)})
    mb = out.stat().st_size / 1e6
    print(f"participant report 256x256x20: {seconds:.2f} s, {mb:.2f} MB")
    assert mb < 8
    assert seconds < 15  # ~1-2 s on an idle machine; generous for loaded CI


@pytest.mark.slow
def test_participant_report_1mm_size(tmp_path):
    out, seconds = render(tmp_path, geometry={"shape": (182, 218, 182), "zooms": (1.0, 1.0, 1.0)})
    mb = out.stat().st_size / 1e6
    print(f"participant report 182x218x182: {seconds:.2f} s, {mb:.2f} MB")
    assert mb < 25


def test_participant_report_in_chromium(tmp_path):
    out, _ = render(tmp_path)
    drv = check_page(out, "participant.png")
    try:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(drv, 60).until(lambda d: d.execute_script(
            "return document.getElementById('viewer-box').dataset.ready === '1'"
            " || document.getElementById('viewer-status').textContent.indexOf('unavailable') >= 0"))
        status = drv.find_element("id", "viewer-status").text
        assert "unavailable" not in status, status
        assert drv.execute_script("return document.title").startswith("ms3seg-app report: sub-01_ses-01 <script>")
        assert drv.execute_script("return window.alertCalled === undefined && "
                                  "document.querySelectorAll('h1 script, table script').length === 0")
        before = drv.find_element("id", "slice-text").text
        drv.execute_script("document.getElementById('viewer').scrollIntoView()")
        time.sleep(0.3)
        drv.save_screenshot(str(ARTIFACTS / "participant-viewer-start.png"))
        canvas_before = drv.execute_script(
            "return document.getElementById('viewer-canvas').toDataURL('image/png').length")
        # move the slider with the keyboard: the viewer's own crosshair (slice text) must follow
        slider = drv.find_element("id", "slice")
        from selenium.webdriver.common.keys import Keys

        slider.send_keys(Keys.END)
        WebDriverWait(drv, 10).until(lambda d: d.find_element("id", "slice-text").text != before)
        after = drv.find_element("id", "slice-text").text
        assert int(after) == int(slider.get_attribute("max")), (before, after)
        frac = drv.execute_script("return document.getElementById('viewer-status').dataset.slice")
        assert frac == after
        # toggling a class and the window redraw without errors
        drv.find_element("css selector", "input.cls[data-class='3']").click()
        drv.execute_script("var w = document.getElementById('win-hi'); w.value = w.max / 3;"
                           "w.dispatchEvent(new Event('input'));")
        time.sleep(0.5)
        errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # nothing the viewer did after the page load left the file either
        import json

        urls = [json.loads(e["message"])["message"]["params"]["request"]["url"]
                for e in drv.get_log("performance")
                if json.loads(e["message"])["message"].get("method") == "Network.requestWillBeSent"]
        assert not [u for u in urls if not u.startswith(("file:", "data:", "blob:"))], urls
        full_screenshot(drv, "participant-full.png")
        drv.execute_script("document.getElementById('viewer').scrollIntoView()")
        drv.save_screenshot(str(ARTIFACTS / "participant-viewer.png"))
        assert canvas_before > 0
    finally:
        drv.quit()


def group_inputs(n=4, sessions=True):
    rows = []
    rng = np.random.default_rng(1)
    for i in range(n):
        for ses in (["ses-01", "ses-02"] if sessions and i == 0 else ["n/a"]):
            pid = f"sub-{i + 1:02d}"
            prefix = pid + ("" if ses == "n/a" else f"_{ses}")
            les = rng.uniform(0.5, 9)
            pv, jc = rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.3)
            rows.append({"participant_id": pid, "session_id": ses, "acq": "n/a", "run": "n/a",
                         "prefix": prefix, "report": f"{prefix}.html", "abnormal_wmh_ml": les,
                         "normal_wmh_ml": rng.uniform(0.5, 2), "ventricles_ml": rng.uniform(15, 40),
                         "icv_ml": rng.uniform(1200, 1600), "lesion_count": int(rng.integers(1, 20)),
                         "abnormal_wmh_icv_fraction": les / 1400, "normal_wmh_icv_fraction": 1 / 1400,
                         "ventricles_icv_fraction": 25 / 1400,
                         "lesion_periventricular_ml": les * pv, "lesion_juxtacortical_ml": les * jc,
                         "lesion_deep_ml": les * (1 - pv - jc), "lesion_periventricular_share": pv,
                         "lesion_juxtacortical_share": jc, "lesion_deep_share": 1 - pv - jc,
                         "age": 25 + 7 * i, "sex": "FM"[i % 2], "group": EVIL if i == 1 else "RRMS",
                         "qc_flags": "ICV outlier" if i == 2 else ""})
    df = pd.DataFrame(rows)
    from ms3seg_app.group import statistics

    tests, bands = statistics(df)
    long = pd.DataFrame([{"participant_id": "sub-01", "session_from": "ses-01", "session_to": "ses-02",
                          "delta_abnormal_wmh_ml": 0.4, "delta_normal_wmh_ml": 0.0, "delta_ventricles_ml": 0.2,
                          "n_new_lesions": 1, "n_enlarging_lesions": 0, "new_lesion_volume_mm3": 12.0,
                          "registration": "antspy-rigid"}]) if sessions else pd.DataFrame()
    qc = pd.DataFrame({"participant_id": ["sub-bad", "sub-03"], "flair": ["sub-bad_FLAIR", "sub-03"],
                       "problem": [f"failed: cannot read {EVIL}", "ICV outlier"]})
    return df, tests, bands, long, qc


@pytest.mark.parametrize("n", [3, 12])
def test_group_report(tmp_path, n):
    df, tests, bands, long, qc = group_inputs(n)
    out = write_group_report(tmp_path / "group.html", df, tests, bands, long, qc)
    text = out.read_text()
    assert_self_contained(text)
    assert EVIL not in text and htmlmod.escape(EVIL, quote=False) in text
    for prefix in df["prefix"]:
        assert f'href="{prefix}.html"' in text, prefix
    assert 'id="fig-distributions"' in text and 'id="fig-locations"' in text
    # box plots only from 5 FLAIRs on (the caption says which)
    assert ("with box plots" in text) == (len(df) >= 5)
    assert ("no box plot below 5 FLAIRs" in text) == (len(df) < 5)
    # age bands as a compact table: one row per measure, one column per band
    if len(bands):
        assert 'id="agebands-ml"' in text and "median (IQR)" in text
    # location shares per FLAIR (participant and session), never pooled: one row each, in %
    shares = text[text.index('id="shares"'):]
    shares = shares[:shares.index("</table>")]
    assert shares.count("<tr>") == len(df) + 1
    pv = 100 * df["lesion_periventricular_share"].iloc[0]
    assert f">{pv:.3g}<" in shares
    assert "one bar per FLAIR" in text or len(df) > 40


def test_group_report_in_chromium(tmp_path):
    df, tests, bands, long, qc = group_inputs(6)
    for prefix in df["prefix"]:  # the linked participant reports exist
        (tmp_path / f"{prefix}.html").write_text("<!DOCTYPE html><title>x</title>")
    out = write_group_report(tmp_path / "group.html", df, tests, bands, long, qc)
    drv = check_page(out, "group.png")
    try:
        links = drv.execute_script("return Array.from(document.querySelectorAll('#burden a'))"
                                   ".map(function (a) { return a.getAttribute('href'); });")
        assert set(df["report"]) <= set(links)
        col = drv.execute_script(
            "var th = Array.from(document.querySelectorAll('#burden th'));"
            "return th.findIndex(function (h) { return h.textContent.trim() === 'abnormal_wmh_ml'; });")
        assert col >= 0
        drv.find_elements("css selector", "#burden th")[col].click()
        vals = drv.execute_script("return Array.from(document.querySelectorAll('#burden tbody tr'))"
                                  ".map(function (r) { return parseFloat(r.cells[%d].textContent); });" % col)
        assert vals == sorted(vals)
        width = drv.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
        assert width[0] <= width[1], f"page wider than the window: {width}"
        errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        full_screenshot(drv, "group-full.png")
    finally:
        drv.quit()


def test_report_draws_the_classes_of_the_card_that_made_the_segmentation(tmp_path):
    """Colours and lesion label come from the model card's class table, not the package's."""
    from ms3seg_app.model.card import ClassInfo

    classes = (ClassInfo(0, "background", "BG", "#000000"), ClassInfo(1, "ventricles", "VEN", "#123456"),
               ClassInfo(2, "normal WMH", "NWMH", "#00aa00"), ClassInfo(3, "abnormal WMH", "AWMH", "#ff8800"))
    out, _ = render(tmp_path, classes=classes)
    html = out.read_text()
    for color in ("#123456", "#00aa00", "#ff8800"):
        assert color in html
    assert "#ff0000" not in html and "#0000ff" not in html
    default, _ = render(tmp_path, name="sub-01_ses-02.html")
    assert "#ff0000" in default.read_text()


def _decode_png(b64: str) -> np.ndarray:
    import base64
    import io

    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(base64.b64decode(b64)), format="png")[..., :3]


def test_block_reduction_of_mosaic_tiles():
    from ms3seg_app.reports.individual import _shrink

    a = np.arange(30, dtype=np.float32).reshape(5, 6)
    np.testing.assert_array_equal(_shrink(a, 1, "mean"), a)
    m = _shrink(a, 2, "mean")
    assert m.shape == (3, 3) and m.dtype == np.float32
    assert m[0, 0] == (0 + 1 + 6 + 7) / 4 and m[2, 2] == (28 + 29 + 28 + 29) / 4  # last row edge-padded
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0], lab[1, 1], lab[3, 2] = 1, 2, 3
    np.testing.assert_array_equal(_shrink(lab, 2, "max"), [[2, 0], [0, 3]])
    np.testing.assert_array_equal(_shrink(lab == 1, 2, "any"), [[True, False], [False, False]])


@pytest.mark.parametrize("lesion_label", [3, 1])
def test_shrunk_mosaic_of_a_512_slice_keeps_a_one_voxel_lesion_where_it_is(lesion_label):
    """A 512x512 slice is drawn from 2x2 blocks (a 208-px tile); a one-voxel lesion still
    shows, in its colour and place, even beside another class in its block."""
    from ms3seg_app.reports.individual import _mosaic, class_table

    n = 512
    base = np.full((n, n, 1), 100.0, np.float32)
    lab = np.zeros((n, n, 1), np.uint8)
    other = 2 if lesion_label == 3 else 3  # a lower or a higher label in the same 2x2 block
    i, j = 100, 300
    lab[i, j], lab[i + 1, j], lab[i, j + 1] = lesion_label, other, other
    classes = [{"index": 0, "name": "bg", "abbr": "BG", "color": "#000000"},
               {"index": lesion_label, "name": "lesion", "abbr": "AWMH", "color": "#ff0000"},
               {"index": other, "name": "other", "abbr": "NWMH", "color": "#00ff00"}]
    png = _decode_png(_mosaic([0], base, (0.45, 0.45, 0.6), 0.0, 200.0, labels=lab, classes=classes,
                              lesion_label=lesion_label))
    assert png.shape[:2] == (208, 208)  # 2.6 in at 80 dpi, as without shrinking
    # a one-pixel overlay in a tile drawn 0.8x is blended by the antialiasing (as for a 256x256 slice)
    red = (png[..., 0] - png[..., 1] > 0.1) & (png[..., 0] - png[..., 2] > 0.1)
    assert red.any(), "the one-voxel lesion vanished from the shrunk tile"
    rows, cols = np.nonzero(red)
    # radiological display: column from the right (i), row from the front (j)
    want_col, want_row = (n - 1 - i) * 208 / n, (n - 1 - j) * 208 / n
    assert abs(cols.mean() - want_col) < 3 and abs(rows.mean() - want_row) < 3


def test_tiles_are_not_shrunk_below_their_displayed_width_or_height():
    """One voxel per displayed pixel at least, along both axes of a 2.6-inch (208-px) tile."""
    from ms3seg_app.reports.individual import _shrink_factor

    assert _shrink_factor(512, 1.0, 2.6) == 2   # 512 columns over 208 px
    assert _shrink_factor(352, 1.0, 2.6) == 1   # 352 over 208: halving would leave 176
    assert _shrink_factor(256, 1.0, 2.6) == 1   # clinical slices: never shrunk
    assert _shrink_factor(512, 2.0, 2.6) == 1   # rows twice as tall as wide: 512 rows over 416 px
    assert _shrink_factor(1024, 1.0, 2.2) == 5  # 1024 over 176 px


def test_group_burden_plots_take_the_colours_of_the_run_class_table():
    """The three burden plots are coloured like the run's classes (desc-trimask_dseg.tsv),
    as the participant reports are; without a table, in the MS3SEG colours."""
    from ms3seg_app.model.card import ClassInfo
    from ms3seg_app.reports.group import figures

    df, _, _, long, _ = group_inputs(12)
    classes = (ClassInfo(0, "background", "BG", "#000000"), ClassInfo(1, "ventricles", "VEN", "#123456"),
               ClassInfo(2, "normal WMH", "NWMH", "#00aa00"), ClassInfo(3, "abnormal WMH", "AWMH", "#ff8800"))

    def has(png, color):
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
        return bool((np.abs(png - rgb).max(axis=-1) < 0.02).any())

    dist = lambda figs: _decode_png(next(f["png"] for f in figs if f["id"] == "distributions"))  # noqa: E731
    ours, default = dist(figures(df, long, classes)), dist(figures(df, long))
    assert has(ours, "#ff8800") and has(ours, "#123456") and not has(ours, "#ff0000")
    assert has(default, "#ff0000") and has(default, "#0000ff") and not has(default, "#ff8800")
