"""The app in a real headless Chromium (Playwright): load, generate, see the image, export a grid.

Needs Debian's ``chromium`` (apt-get install -y chromium) and the ``playwright`` package;
skips with that reason when either is missing.  Set STUDIO_SCREENSHOTS=docs/screenshots
to (re)write the committed screenshot of each tab.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ui_server import start_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Debian chromium not installed (apt-get install chromium)"
    ),
]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TABS = ["Generate", "Compare", "Adapters", "Vision", "Train"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright package not installed")
    data = tmp_path_factory.mktemp("studio-browser")
    _, app, url = start_app(data)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.goto(url)
        pg.get_by_role("tab", name="Generate").wait_for(timeout=60_000)
        yield pg
        browser.close()
    app.close()


def _shot(pg, name: str, tmp: Path) -> None:
    target = Path(os.environ.get("STUDIO_SCREENSHOTS", tmp))
    target.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(target / f"{name.lower()}.png"), full_page=True)


def test_generate_shows_image(page, tmp_path):
    page.get_by_role("tab", name="Generate").click()
    page.locator("#generate-btn").click()
    img = page.locator("#output-image img")
    img.wait_for(timeout=120_000)
    assert img.get_attribute("src")
    page.wait_for_function(
        "document.querySelector('#parameters textarea').value.includes('Seed:')", timeout=60_000
    )
    assert "a red circle" in page.locator("#parameters textarea").input_value()
    _shot(page, "generate", tmp_path)


def test_compare_exports_grid(page, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#grid-btn").click()
    page.locator("#grid-image img").wait_for(timeout=120_000)
    link = page.locator("#grid-files a[download='grid.json']")
    link.wait_for(timeout=60_000)
    assert page.locator("#grid-files a[download='grid.png']").count() == 1
    sidecar = page.request.get(link.get_attribute("href")).json()
    assert len(sidecar["cells"]) == 6 and sidecar["row_labels"][0] == "baseline (no adapter)"
    _shot(page, "compare", tmp_path)


def test_other_tabs_render_and_errors_show_as_messages(page, tmp_path):
    page.get_by_role("tab", name="Adapters").click()
    page.locator("text=example-attn >> visible=true").first.wait_for(timeout=30_000)
    _shot(page, "adapters", tmp_path)
    disk = page.locator("#disk-path input")
    disk.fill("/etc/passwd")
    disk.press("Enter")
    page.locator("#load-btn").click()
    page.locator("text=outside the configured folders >> visible=true").first.wait_for(timeout=60_000)
    assert page.get_by_text("Traceback").count() == 0
    for tab in ("Vision", "Train"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(500)
        _shot(page, tab, tmp_path)
