"""Open an HTML report in headless Chromium (Debian chromium + chromium-driver) via Selenium."""
import json
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def chromium_driver():
    """A headless Chromium WebDriver with browser and network logs, or skip with the reason."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chrome or not driver_bin:
        pytest.skip("Chromium/chromedriver not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install -e '.[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              # WebGL2 for the embedded NiiVue viewer without a GPU (software rendering of a local file)
              "--enable-unsafe-swiftshader",
              "--window-size=1300,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


def check_page(html: Path, screenshot_name: str) -> "webdriver.Chrome":
    """Load a report and assert: no console errors, no request outside file:/data:, images decode.

    Returns the driver (caller quits it) for further interaction; saves a screenshot
    to ``test-artifacts/``.
    """
    drv = chromium_driver()
    drv.get(html.resolve().as_uri())
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    urls = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    leaving = [u for u in urls if not u.startswith(("file:", "data:"))]
    assert not leaving, leaving
    n, ok = drv.execute_script(
        "var im = Array.from(document.images);"
        "return [im.length, im.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length];")
    assert n > 0 and ok == n, f"{n - ok} of {n} images did not decode"
    ARTIFACTS.mkdir(exist_ok=True)
    drv.save_screenshot(str(ARTIFACTS / screenshot_name))
    return drv


def full_screenshot(drv, name: str) -> Path:
    """Screenshot of the whole page (beyond the viewport) to ``test-artifacts/<name>``."""
    import base64

    ARTIFACTS.mkdir(exist_ok=True)
    shot = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
