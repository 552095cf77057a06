"""Debian's Chromium driven by Playwright (no `playwright install`: the system browser is used)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from r1nest.paths import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "overview"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_or_skip() -> Path:
    path = CHROMIUM if CHROMIUM.exists() else (Path(shutil.which("chromium")) if shutil.which("chromium") else None)
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup-env installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    return path


@contextmanager
def launched_browser():
    from playwright.sync_api import sync_playwright

    path = chromium_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(path), args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def screenshot_of(locator, name: str) -> Path:
    """A screenshot of one element (e.g. the usage panel), beside the page screenshots."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    locator.screenshot(path=str(path))
    return path
