"""End to end: `retrieval-heads report` writes one HTML file that works offline in a real browser.

Opens the report in headless Chromium (selenium + chromedriver; `.ci/install-browser.sh`
installs them), then checks: no console error, no http(s) request, the interactive heatmap is
drawn and its hover shows layer, head, score and activation frequency. A screenshot is saved
(to $RETRIEVAL_HEADS_ARTIFACTS when set, else the test's tmp folder). Skipped, with the reason,
only where selenium or a Chromium + chromedriver pair is missing. No model is built.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval_heads.cli import app


def _browser() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary = next(
        (
            b
            for b in (
                os.environ.get("CHROME_BIN"),
                shutil.which("chromium"),
                shutil.which("chromium-browser"),
                shutil.which("google-chrome"),
            )
            if b
        ),
        None,
    )
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(
            "no headless Chromium + chromedriver here (run .ci/install-browser.sh: apt chromium chromium-driver)"
        )
    return binary, driver


def _run_folder(path: Path, rng: np.random.Generator, n_layers: int = 4, n_heads: int = 6) -> Path:
    """A tiny run folder as `detect` writes it: config.json and records.jsonl."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": "tiny-test-model"}))
    lines = []
    for length in (100, 200):
        for depth in (0.0, 50.0, 100.0):
            counts = rng.poisson(0.6, size=(n_layers, n_heads))
            counts[1, 2] += 5  # one clear retrieval head
            recall = float(rng.uniform(0.3, 1.0))
            lines.append(
                json.dumps(
                    {
                        "id": f"n-L{length}-D{depth:g}",
                        "needle_id": "n",
                        "length": length,
                        "depth": depth,
                        "answer_recall": recall,
                        "kept": recall > 0.5,
                        "copy_counts": counts.tolist(),
                        "needle_tokens": 8,
                        "generated_text": "...",
                    }
                )
            )
    (path / "records.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_report_opens_offline_in_chromium(tmp_path: Path) -> None:
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rng = np.random.default_rng(0)
    run = _run_folder(tmp_path / "run", rng)
    authors = tmp_path / "authors-format.json"  # a second score map of the same shape: correlation section
    authors.write_text(
        json.dumps({f"{l}-{h}": rng.uniform(0, 0.3, size=5).round(3).tolist() for l in range(4) for h in range(6)})
    )
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(run), str(authors), "-o", str(out), "--top", "5"])
    assert res.exit_code == 0, res.output
    html = out.read_text(encoding="utf-8")
    assert "<link" not in html and "<iframe" not in html
    assert 'src="http' not in html, "every script and image must be inlined"

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
    ):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="rh-chromium-", dir=tmp_path)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as e:  # a browser that is installed but cannot start here
        pytest.skip(f"Chromium could not start: {str(e).splitlines()[0]}")
    try:
        driver.set_page_load_timeout(30)
        driver.get_log("performance")  # drop the browser's own start-up page (chrome://new-tab-page)
        driver.get(out.as_uri())
        drawn = (
            "return document.querySelectorAll('#heatmap-0 .heatmaplayer image').length"
            " + document.querySelectorAll('#heatmap-0 .hm').length"
        )
        WebDriverWait(driver, 20).until(lambda d: d.execute_script(drawn) > 0)
        info = driver.execute_script(
            "var gd = document.getElementById('heatmap-0');"
            "return {type: gd._fullData[0].type, rows: gd._fullData[0].z.length,"
            "        cols: gd._fullData[0].z[0].length, imgs: document.images.length,"
            "        broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length};"
        )
        assert info["type"] == "heatmap" and (info["rows"], info["cols"]) == (4, 6)
        assert info["imgs"] >= 5 and info["broken"] == 0, info
        assert not driver.execute_script("return document.querySelectorAll('[data-title^=\"Share\"]').length"), (
            "plotly's cloud-share button would upload the chart"
        )
        # move the mouse onto the strongest head (layer 1, head 2; layer 0 is the top row)
        area = driver.find_element(By.CSS_SELECTOR, "#heatmap-0 .nsewdrag")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", area)
        w, h = area.rect["width"], area.rect["height"]
        ActionChains(driver).move_to_element_with_offset(
            area, int(((2 + 0.5) / 6 - 0.5) * w), int(((1 + 0.5) / 4 - 0.5) * h)
        ).perform()
        hover_text = "var h = document.querySelector('#heatmap-0 .hoverlayer'); return h ? h.textContent : '';"
        WebDriverWait(driver, 5).until(lambda d: "layer" in d.execute_script(hover_text))
        hover = driver.execute_script(hover_text)
        score = float(
            np.mean(
                [
                    r["copy_counts"][1][2] / 8
                    for r in map(json.loads, (run / "records.jsonl").read_text().splitlines())
                    if r["kept"]
                ]
            )
        )
        assert "layer 1" in hover and "head 2" in hover, hover
        assert f"score {score:.3f}" in hover and "activation frequency 1.00" in hover, hover

        shots = Path(os.environ.get("RETRIEVAL_HEADS_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / "report_screenshot.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, f"console errors: {errors}"
        urls = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        assert out.as_uri() in urls, "the performance log recorded no request at all"
        remote = [u for u in urls if u.split(":", 1)[0].lower() in ("http", "https", "ws", "wss", "ftp")]
        assert not remote, f"network requests from an offline report: {remote}"
    finally:
        driver.quit()
