"""Headless Chromium for the page tests (curate report, curate browse).

Debian's `chromium` package (installed by .ci/run) driven by Playwright's Python client
(`playwright` in the test extra). Playwright's own browser download is never used: it
needs the web, which tests do not have.
"""

from __future__ import annotations

import contextlib
import os
import shutil

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The Chromium binary (CURATION_CHROMIUM overrides); raises if there is none, so a
    missing browser fails the test instead of skipping it."""
    override = os.environ.get("CURATION_CHROMIUM")
    if override:
        return override
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Chromium found: install Debian's chromium package (apt-get install chromium)")


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 900):
    """A fresh headless page; console errors are collected in page.console_errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.console_errors = []
            page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
            page.on("pageerror", lambda e: page.console_errors.append(str(e)))
            yield page
        finally:
            browser.close()
