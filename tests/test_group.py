"""Group level: rows and QC flags, statistics on known examples, longitudinal change, HTML in Chromium."""
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from browser import check_page
from conftest import needs_shared
from ms3seg_app.cli.run import main
from ms3seg_app.group import age_band, mann_whitney, robust_z, statistics
from ms3seg_app.longitudinal import lesion_changes, longitudinal_changes


@needs_shared
def test_group_rows_flags_and_reports(mixed_study):
    bids, out, _ = mixed_study
    assert main([str(bids), str(out), "group"]) == 0
    df = pd.read_csv(out / "group_desc-trimask_volumes.tsv", sep="\t", keep_default_na=False)
    assert list(df["participant_id"]) == ["sub-01", "sub-01", "sub-02", "sub-104670", "sub-105755",
                                          "sub-112776", "sub-dup"]
    assert list(df["session_id"][:2]) == ["ses-01", "ses-02"]
    assert df["flair_source"][0] == "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz"
    dup = dict(zip(df["participant_id"], df["qc_duplicate_input"].astype(str)))
    assert dup["sub-02"] == dup["sub-dup"] == "True" and dup["sub-104670"] == "False"
    assert list(df["age"]) == [34, 34, 52, 38, 57, 45, 41]
    qc = pd.read_csv(out / "group_desc-trimask_qc.tsv", sep="\t", keep_default_na=False)
    problems = dict(zip(qc["participant_id"] + "|" + qc["problem"].str[:20], qc["problem"]))
    assert any(k.startswith("sub-bad|failed") for k in problems)
    assert "cannot read" in next(v for k, v in problems.items() if k.startswith("sub-bad"))
    assert any(k.startswith("sub-missing|no participant") for k in problems)
    assert any(k.startswith("sub-dup|identical input") for k in problems)
    long = pd.read_csv(out / "group_desc-trimask_longitudinal.tsv", sep="\t")
    assert list(long["participant_id"]) == ["sub-01"] and long["registration"][0] == "antspy-rigid"
    tests = pd.read_csv(out / "group_desc-trimask_stats.tsv", sep="\t")
    assert "Spearman correlation" in set(tests["test"])
    # re-running gives the same file
    first = (out / "group_desc-trimask_volumes.tsv").read_bytes()
    assert main([str(bids), str(out), "group"]) == 0
    assert (out / "group_desc-trimask_volumes.tsv").read_bytes() == first
    # the two reports in headless Chromium
    drv = check_page(out / "group.html", "group.png")
    try:
        col = drv.execute_script(
            "var th = Array.from(document.querySelectorAll('#burden th'));"
            "return th.findIndex(function (h) { return h.textContent.trim() === 'abnormal_wmh_ml'; });")
        read = ("return Array.from(document.querySelectorAll('#burden tbody tr'))"
                ".map(function (r) { return parseFloat(r.cells[%d].textContent); });" % col)
        header = drv.find_elements("css selector", "#burden th")[col]
        header.click()
        asc = drv.execute_script(read)
        assert asc == sorted(asc)
        header.click()
        desc = drv.execute_script(read)
        assert desc == sorted(desc, reverse=True)
        links = drv.execute_script("return Array.from(document.querySelectorAll('#burden a'))"
                                   ".map(function (a) { return a.getAttribute('href'); });")
        assert "sub-01_ses-01.html" in links and "sub-104670.html" not in links  # only existing reports
    finally:
        drv.quit()
    check_page(out / "sub-01_ses-01.html", "participant.png").quit()


def test_group_without_results_is_a_clear_error(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "bids_example"
    assert main([str(example), str(tmp_path / "nothing"), "group"]) == 1


def test_mann_whitney_against_hand_computation():
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    r = mann_whitney(a, b)
    assert r["statistic"] == 0.0            # every a below every b
    # Z = (U - n1 n2 / 2) / sqrt(n1 n2 (n+1) / 12) = -12.5 / sqrt(22.9167) = -2.611
    assert r["effect_size"] == pytest.approx(2.6112 / np.sqrt(10), rel=1e-3)
    assert r["p"] == pytest.approx(stats.mannwhitneyu(a, b, method="asymptotic").pvalue)


def test_statistics_spearman_bonferroni_and_bands():
    df = pd.DataFrame({
        "participant_id": [f"sub-{i}" for i in range(8)], "session_id": "n/a", "acq": "n/a", "run": "n/a",
        "age": [20, 25, 33, 38, 45, 52, 61, 70], "sex": ["F", "M"] * 4,
        "abnormal_wmh_ml": [1, 2, 3, 4, 5, 6, 7, 8.0], "normal_wmh_ml": [1, 1, 1, 2, 2, 2, 3, 3.0],
        "ventricles_ml": [8, 7, 6, 5, 4, 3, 2, 1.0], "abnormal_wmh_icv_fraction": np.arange(8) / 100,
        "normal_wmh_icv_fraction": np.ones(8) / 100, "ventricles_icv_fraction": np.arange(8)[::-1] / 100,
        "lesion_periventricular_share": np.linspace(0.4, 0.8, 8)})
    tests, bands = statistics(df)
    sp = tests[(tests["test"] == "Spearman correlation")].set_index("measure")
    assert sp.loc["abnormal_wmh_ml", "statistic"] == pytest.approx(1.0)
    assert sp.loc["ventricles_ml", "statistic"] == pytest.approx(-1.0)
    assert "normal_wmh_icv_fraction" not in sp.index  # constant: no test
    assert np.allclose(tests["p_bonferroni"], np.minimum(1, tests["p"] * len(tests)))
    mw = tests[tests["test"] == "Mann-Whitney U"]
    assert len(mw) and mw["factor"].iloc[0] == "sex (F vs M)"
    assert list(bands["age_band"]) == ["18-29", "30-39", "40-49", "50-59", "60+"]
    assert [age_band(a) for a in (18, 29.5, 30, 59, 60, 95, "n/a", 12)] == \
        ["18-29", "18-29", "30-39", "50-59", "60+", "60+", "n/a", "n/a"]
    z = robust_z(pd.Series([10, 11, 9, 10, 10, 50.0]))
    assert abs(z.iloc[-1]) > 3.5 and abs(z.iloc[0]) < 1


def test_lesion_changes_new_and_enlarging():
    e = np.zeros((30, 30, 10), bool)
    later = np.zeros_like(e)
    e[5:8, 5:8, 2:4] = True            # stable lesion (18 voxels)
    later[5:8, 5:8, 2:4] = True
    e[15:17, 15:17, 5] = True          # grows from 4 to 18 voxels: enlarging
    later[15:18, 15:18, 4:6] = True
    later[25:28, 25:28, 7] = True      # new (9 voxels)
    r = lesion_changes(e, later, voxel_mm3=1.0)
    assert (r["n_new_lesions"], r["n_enlarging_lesions"], r["new_lesion_volume_mm3"]) == (1, 1, 9.0)


def _phantom(shift=(0, 0), new_lesion=False):
    x, y, z = np.meshgrid(np.arange(96), np.arange(96), np.arange(16), indexing="ij")
    cx, cy = 48 + shift[0], 48 + shift[1]
    img = np.zeros((96, 96, 16), np.float32)
    lab = np.zeros((96, 96, 16), np.uint8)
    head = ((x - cx) / 35.0) ** 2 + ((y - cy) / 42.0) ** 2 + ((z - 8) / 9.0) ** 2 < 1
    img[head] = 400
    vent = ((x - cx) / 6.0) ** 2 + ((y - cy) / 15.0) ** 2 + ((z - 8) / 4.0) ** 2 < 1
    img[vent], lab[vent] = 80, 1
    les = ((x - cx - 18) ** 2 + (y - cy + 10) ** 2 < 9) & (abs(z - 8) <= 1)
    img[les], lab[les] = 750, 3
    if new_lesion:
        les2 = ((x - cx + 20) ** 2 + (y - cy - 15) ** 2 < 9) & (abs(z - 6) <= 1)
        img[les2], lab[les2] = 750, 3
    img += np.random.default_rng(int(new_lesion)).normal(0, 5, img.shape).astype(np.float32) * head
    return img, lab


@pytest.mark.parametrize("lesion_label", [3, 1, None])
def test_longitudinal_registration_finds_the_new_lesion(tmp_path, lesion_label, monkeypatch):
    """Lesion changes use the lesion label of the run's class table (desc-trimask_dseg.tsv):
    MS3SEG's 3, or 1 for a card that numbers the classes otherwise; without a table the
    volume changes are kept and the lesion changes say why they are missing."""
    from ms3seg_app.derivatives import write_top_level
    from ms3seg_app.model.card import ClassInfo

    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    bids, out = tmp_path / "bids", tmp_path / "out"
    if lesion_label is not None:
        names = {0: ("background", "BG"), 1: ("ventricles", "VEN"), 2: ("normal WMH", "NWMH"), 3: ("abnormal WMH", "AWMH")}
        if lesion_label == 1:
            names[1], names[3] = names[3], names[1]
        write_top_level(out, [ClassInfo(i, n, a, "#000000") for i, (n, a) in names.items()])
    rows = []
    for ses, shift, new in (("ses-1", (0, 0), False), ("ses-2", (3, -2), True)):
        img, lab = _phantom(shift, new)
        if lesion_label == 1:  # the same anatomy, lesions labelled 1 and ventricles 3
            lab = np.choose(lab, [0, 3, 2, 1]).astype(np.uint8)
        d_b, d_o = bids / "sub-x" / ses / "anat", out / "sub-x" / ses / "anat"
        d_b.mkdir(parents=True)
        d_o.mkdir(parents=True)
        nib.save(nib.Nifti1Image(img, aff), str(d_b / f"sub-x_{ses}_FLAIR.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(d_o / f"sub-x_{ses}_space-orig_desc-trimask_dseg.nii.gz"))
        rows.append({"participant_id": "sub-x", "session_id": ses, "acq": "n/a", "run": "n/a",
                     "flair": f"sub-x_{ses}_FLAIR.nii.gz", "prefix": f"sub-x_{ses}",
                     "flair_source": f"bids:raw:sub-x/{ses}/anat/sub-x_{ses}_FLAIR.nii.gz",
                     "abnormal_wmh_ml": float((lab == (lesion_label or 3)).sum() * 3 / 1000), "normal_wmh_ml": 0.0,
                     "ventricles_ml": float((lab == (4 - (lesion_label or 3))).sum() * 3 / 1000)})
    long = longitudinal_changes(pd.DataFrame(rows), bids, out)
    assert len(long) == 1
    r = long.iloc[0]
    assert r["delta_abnormal_wmh_ml"] > 0 and abs(r["delta_ventricles_ml"]) < 1e-9
    if lesion_label is None:
        assert "no lesion label" in r["registration"] and np.isnan(r["n_new_lesions"])
        return
    assert r["registration"] == "antspy-rigid"
    assert (r["n_new_lesions"], r["n_enlarging_lesions"]) == (1, 0)
    # the group level passes the class table it has read: not read a second time, same changes
    import ms3seg_app.derivatives as derivatives

    classes = derivatives.read_class_table(out)
    monkeypatch.setattr(derivatives, "read_class_table", lambda *a: pytest.fail("class table read twice"))
    again = longitudinal_changes(pd.DataFrame(rows), bids, out, classes).iloc[0]
    assert (again["n_new_lesions"], again["n_enlarging_lesions"]) == (1, 0)
    # the input is the one the dseg sidecar names (the group table's `source`), not a path
    # rebuilt from the file name: a row without it gets its volume changes and no lesion changes
    unnamed = longitudinal_changes(pd.DataFrame([{**r, "flair_source": ""} for r in rows]), bids, out, classes).iloc[0]
    assert "not a bids:raw: URI" in unnamed["registration"] and np.isnan(unnamed["n_new_lesions"])
    assert unnamed["delta_abnormal_wmh_ml"] == r["delta_abnormal_wmh_ml"]
