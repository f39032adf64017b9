"""End to end: the attribution page (`Attribution.save`) works offline in a real browser.

A tiny random model answers a question about two passages (one holding HTML-like text that must be
shown, not run); the page is opened in headless Chromium (selenium + chromedriver, as
test_report_browser.py), then: no console error, no network request, every linked token points to
a sentence that exists, hovering a token highlights its sentence, and the passage's `<script>`
text is shown as text. Skipped, with the reason, only where selenium or a Chromium +
chromedriver pair is missing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from retrieval_heads.attribution import Passage, attribute
from retrieval_heads.testing import tiny_model

from .test_report_browser import _browser

PASSAGES = [
    Passage("a <b>bold</b>.txt", "the captain was named seven . the password is <script>window.pwned=1</script> fig ."),
    Passage("b.txt", "the city of money . people think a good idea is to write ."),
]


def _peaked(lm):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lm.model.modules():
            for name in ("q_proj", "k_proj"):
                if hasattr(m, name):
                    w = getattr(m, name).weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.4)
    return lm


def test_attribution_page_opens_offline_in_chromium(tmp_path: Path) -> None:
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    lm = _peaked(tiny_model("llama"))
    att = attribute(lm, PASSAGES, "what is the password ?", [(0, 0), (1, 1), (1, 3)], chat=False, max_new_tokens=8)
    _, page = att.save(tmp_path / "out")
    linked = [t for t in att.tokens if t.content and t.sentence is not None]
    assert linked, "some token must link to a sentence"

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,1400",
    ):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='rh-chromium-', dir=tmp_path)}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as e:  # a browser that is installed but cannot start here
        pytest.skip(f"Chromium could not start: {str(e).splitlines()[0]}")
    try:
        driver.set_page_load_timeout(30)
        driver.get_log("performance")
        driver.get(page.as_uri())
        info = driver.execute_script(
            "var a = Array.from(document.querySelectorAll('#answer .tok'));"
            "return {tokens: a.length, links: a.filter(x => x.tagName === 'A').length,"
            " dangling: a.filter(x => x.tagName === 'A' && !document.getElementById(x.getAttribute('href').slice(1)))"
            ".length, pwned: window.pwned === 1, scripts: document.scripts.length,"
            " bold: document.querySelectorAll('.passage b, h3 b').length,"
            " shown: document.body.textContent.includes('<script>window.pwned=1</script>')};"
        )
        assert info["tokens"] == len(att.tokens) and info["links"] == len(linked), info
        assert info["dangling"] == 0 and not info["pwned"] and info["scripts"] == 1 and info["bold"] == 0, info
        assert info["shown"], "the passage's markup must be shown as text"
        unsupported = driver.execute_script("return document.querySelectorAll('#answer .unsupported').length")
        assert unsupported == sum(t.state == "unsupported" for t in att.tokens)
        restated = driver.execute_script("return document.querySelectorAll('#answer .question').length")
        assert restated == sum(t.state == "question" for t in att.tokens)
        first = driver.find_element(By.CSS_SELECTOR, "#answer a.tok")
        target = first.get_attribute("href").split("#", 1)[1]
        ActionChains(driver).move_to_element(first).perform()
        active = driver.execute_script(f"return document.getElementById('{target}').classList.contains('active')")
        assert active, "hovering a token highlights its source sentence"
        shots = Path(os.environ.get("RETRIEVAL_HEADS_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shots / "attribution_screenshot.png"))
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, f"console errors: {errors}"
        urls = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        assert page.as_uri() in urls, "the performance log recorded no request at all"
        remote = [u for u in urls if u.split(":", 1)[0].lower() in ("http", "https", "ws", "wss", "ftp")]
        assert not remote, f"network requests from an offline page: {remote}"
    finally:
        driver.quit()
