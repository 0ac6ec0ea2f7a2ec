"""The pages people open, as a browser shows them: every index.html of a small `tiertune report`
and of the demo, opened in headless Chromium. On each page every image loads, every link reaches
a file that exists (and an anchor on the page, where it names one), and the visible text holds no
Markdown syntax, no `None` and no `nan`.

Chromium comes from the system's packages: tests/browser/install_chromium.sh installs it with
apt-get when it is missing (the test skips, saying why, only where there is no apt-get). A
screenshot of each page is kept in tests/artifacts/browser/ (ignored by git). Run alone:
    .venv/bin/python -m pytest -q tests/test_browser.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from tiertune.cli import main

HERE = Path(__file__).parent
INSTALL = HERE / "browser" / "install_chromium.sh"
ARTIFACTS = HERE / "artifacts" / "browser"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NO_APT_GET = 3                         # install_chromium.sh's exit code where there is no package manager

# Markdown a renderer would have consumed; seen in the visible text, the page shows its source.
MARKDOWN_LEFTOVERS = {
    "a link or image": r"!?\[[^\]\n]*\]\([^)\n]*\)",
    "backticks": r"`",
    "bold or italic markers": r"\*\*|__\w",
    "a heading marker": r"(?m)^\s*#{1,6}\s",
    "a list marker": r"(?m)^\s*[-*+]\s+\S",
    "a table row": r"(?m)^\s*\|.*\|\s*$|\|\s*:?-{3,}",
    "a missing value": r"\bNone\b|\bnan\b|\bNaN\b",
}


@pytest.fixture(scope="session")
def browser():
    proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True)
    # No skip: a machine where Chromium cannot be installed fails here, saying why.
    assert proc.returncode != NO_APT_GET, f"headless Chromium cannot be installed: {proc.stderr.strip()}"
    assert proc.returncode == 0, f"{INSTALL} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tiertune-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def look_at(driver, page: Path, screenshot: Path) -> list[str]:
    """Open `page` and return what is wrong with it as the browser shows it; keep a screenshot."""
    driver.get(page.as_uri())
    deadline = time.monotonic() + 30
    while not driver.execute_script("return document.readyState === 'complete' && "
                                    "[...document.images].every(i => i.complete)"):
        assert time.monotonic() < deadline, f"{page}: still loading after 30 s"
        time.sleep(0.1)
    images = driver.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
    links = driver.execute_script("return [...document.links].map(a => a.href)")
    text = driver.execute_script("return document.body.innerText")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(height, 16000))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    driver.set_window_size(1280, 1000)

    problems = [] if images else ["no image on the page"]
    problems += [f"image not loaded: {src[:80]}" for src, width in images if not width]
    for href in links:
        url = urlsplit(href)
        if url.scheme != "file":
            problems.append(f"link leaves the report: {href}")
            continue
        target = Path(unquote(url.path))
        if not target.is_file():
            problems.append(f"link to a missing file: {href}")
        elif url.fragment and target == page and not driver.execute_script(
                "return document.getElementById(arguments[0]) !== null", unquote(url.fragment)):
            problems.append(f"link to a missing anchor: #{url.fragment}")
    for what, pattern in MARKDOWN_LEFTOVERS.items():
        problems += [f"{what} in the visible text: {m.group(0)!r}" for m in re.finditer(pattern, text)][:3]
    return problems


def check_every_page(driver, root: Path, shots: Path) -> int:
    pages = sorted(root.rglob("index.html"))
    problems = []
    for page in pages:
        rel = page.relative_to(root)
        problems += [f"{rel}: {p}" for p in look_at(driver, page, shots / rel.with_suffix(".png"))]
    assert not problems, f"screenshots in {shots}\n" + "\n".join(problems)
    return len(pages)


def test_a_single_file_report_shows_everything_alone(browser, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--model", "gpt3-1.3b", "--hardware", "lsp-a1000-laptop", "--seq", "512",
                 "--time-limit", "1", "--single-file", "-o", str(out)]) == 0
    alone = tmp_path / "shared"
    alone.mkdir()
    shutil.copy(out / "index.html", alone / "index.html")      # the one file, sent to someone
    assert check_every_page(browser, alone, ARTIFACTS / "report") == 1


def test_the_demo_pages_hold_wherever_the_folder_moves(browser, tmp_path):
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        assert main(["demo", "-o", str(tmp_path / "demo"), "--time-limit", "2", "--steps", "3"]) == 0
    finally:
        torch.set_num_threads(threads)             # the demo runs torch on one thread, as validate does
    print(f"demo (--time-limit 2 --steps 3) ran in {time.perf_counter() - started:.0f} s")
    moved = tmp_path / "moved" / "somewhere else"
    shutil.move(tmp_path / "demo", moved)
    assert check_every_page(browser, moved, ARTIFACTS / "demo") == 3
