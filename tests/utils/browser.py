"""Debian's chromium driven by Playwright (launched by its path: nothing is downloaded), and
page checks shared by the clinician's and operator's page tests."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
TABLET = {"width": 820, "height": 1180}  # an iPad Air held upright

#: WCAG 2.1 contrast of every element with its own text against the nearest opaque background.
_CONTRAST_JS = """() => {
  const lum = c => { const v = c.match(/[\\d.]+/g).slice(0, 3).map(x => { x /= 255;
      return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); });
    return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
  const bg = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
      const a = c.match(/[\\d.]+/g); if (a && (a.length < 4 || +a[3] > 0.9)) return c; } return "rgb(255,255,255)"; };
  const bad = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || el.offsetParent === null) continue;
    const a = lum(getComputedStyle(el).color), b = lum(bg(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) bad.push(el.tagName + " '" + el.textContent.trim().slice(0, 30) + "' " + ratio.toFixed(2));
  }
  return bad;
}"""

#: Form fields without a label, images without alt text, buttons and links without a name.
_LABELS_JS = """() => {
  const bad = [];
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea"))
    if (!(el.labels && el.labels.length) && !el.getAttribute("aria-label")) bad.push("unlabelled " + (el.id || el.name));
  for (const el of document.querySelectorAll("img")) if (!el.getAttribute("alt")) bad.push("img without alt " + el.src);
  for (const el of document.querySelectorAll("button, a[href]"))
    if (!(el.textContent.trim() || el.getAttribute("aria-label"))) bad.push("unnamed " + el.outerHTML.slice(0, 60));
  return bad;
}"""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


@contextlib.contextmanager
def browser() -> Iterator[object]:
    """A headless chromium from the system's package, closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip, dev extra) is not installed")
    exe = chromium_path()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        try:
            yield b
        finally:
            b.close()


def check_accessible(page) -> None:
    """Labels, names, alt texts and text contrast (WCAG AA 4.5:1) of the page as shown."""
    assert page.evaluate(_LABELS_JS) == []
    assert page.evaluate(_CONTRAST_JS) == []


def check_fits(page, viewport: dict) -> None:
    """At ``viewport`` nothing makes the page scroll sideways."""
    page.set_viewport_size(viewport)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a {viewport['width']}px screen"


def screenshot(page, name: str) -> None:
    """Write docs/screenshots/NAME.png when IOMT_SCREENSHOTS=1 (the README shows them)."""
    if os.environ.get("IOMT_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.set_viewport_size(DESKTOP)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
