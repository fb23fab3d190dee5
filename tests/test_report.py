"""``uniseg report``: the cohort QC page, opened in a real headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/run): it loads without errors, has one row per case with flagged
cases first, sorts by a clicked column, filters, and its previews render."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import CT

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, coarse_model_dir) -> Path:
    """Three real cases in one output folder: the CT with previews, a crop of it below the liver, and
    the CT once more without a preview (the report draws it)."""
    from uniseg_cli.cli import main

    root = tmp_path_factory.mktemp("cohort")
    scans = root / "scans"
    scans.mkdir()
    ct = nib.load(CT)
    shutil.copy(CT, scans / "abdomen.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[:, :, :60].astype(np.int16), ct.affine), scans / "pelvis.nii.gz")
    out = root / "out"
    assert main(["predict", str(scans), "-t", "liver,spleen", "-m", str(coarse_model_dir), "-o", str(out),
                 "--preview", "--uncertainty", "--no-tta", "-q"]) == 0
    shutil.copy(CT, root / "again.nii.gz")
    assert main(["predict", str(root / "again.nii.gz"), "-t", "liver,spleen", "-m", str(coarse_model_dir), "-o",
                 str(out), "--no-tta", "-q"]) == 0
    return out


def test_the_report_lists_every_case_flagged_first(run_cli, cohort, tmp_path):
    page = tmp_path / "report.html"
    code, stdout, err = run_cli("report", cohort, "-o", page)
    assert code == 0, err
    assert stdout.strip() == str(page)
    text = page.read_text()
    assert text.count("<tr data-flags=") == 3
    assert "<script src" not in text and "http://" not in text and "https://" not in text  # self-contained
    code, _, err = run_cli("report", cohort, "-o", page)
    assert code == 2 and "exists; --force replaces it" in err
    code, _, err = run_cli("report", tmp_path / "nothing", "-o", tmp_path / "r.html")
    assert code == 2 and "not a folder of uniseg outputs" in err


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed "
                                                            "(.ci/run installs them)")
def test_the_report_works_in_headless_chromium(run_cli, cohort, tmp_path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    assert run_cli("report", cohort, "-o", page)[0] == 0
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1200", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        rows = driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr")
        assert len(rows) == 3
        names = lambda: [r.find_elements(By.TAG_NAME, "td")[1].text for r in
                         driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr")]
        flags = [int(r.get_attribute("data-flags")) for r in rows]
        assert flags == sorted(flags, reverse=True) and flags[0] > 0       # flagged cases first
        header = driver.find_elements(By.CSS_SELECTOR, "#cases thead th")
        case_column = next(h for h in header if h.text.strip() == "case")
        case_column.click()
        assert names() == ["abdomen", "again", "pelvis"]
        case_column.click()
        assert names() == ["pelvis", "again", "abdomen"]
        driver.find_element(By.ID, "filter").send_keys("again")
        assert [r.is_displayed() for r in driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr")].count(True) == 1
        assert driver.find_element(By.ID, "shown").text == "1 of 3 cases shown"
        driver.find_element(By.ID, "filter").clear()
        driver.find_element(By.ID, "flagged-only").click()
        shown = driver.find_element(By.ID, "shown").text
        assert shown == f"{sum(1 for f in flags if f)} of 3 cases shown"
        driver.find_element(By.ID, "flagged-only").click()
        images = driver.find_elements(By.CSS_SELECTOR, "img.preview")
        assert len(images) == 3   # two written by predict --preview, one drawn by the report
        for image in images:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100
            pixels = np.asarray(Image.open(io.BytesIO(image.screenshot_as_png)).convert("L"), dtype=np.float32)
            assert pixels.std() > 10          # not blank: the scan's grey values and the labels' colours
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
