"""A real browser drives notebook 08 in JupyterLab: run all cells, move the step slider of the KV
cache widget, and check that the cache grows on the page and the bytes stay equal to the formula.

Uses the server helpers of tests/test_browser.py on a temporary copy of notebook 08. Screenshots go
to ``figures/browser_08_before.png`` and ``figures/browser_08_after.png``. Skipped when Chromium
or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_browser import CHROMIUM, FIGURES, ROOT, free_port, wait_for_server, wait_until

NOTEBOOK = "08_decode_and_kv_cache.ipynb"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def lab08(tmp_path):
    """A JupyterLab server on a copy of notebook 08; yields (base_url, token)."""
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}",
           "--ip=127.0.0.1", f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
           f"--ServerApp.root_dir={work}", f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter_config"), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
        yield f"http://127.0.0.1:{port}", token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


def summary(page) -> str:
    loc = page.locator(".widget-html", has_text="positions cached")
    return loc.first.inner_text() if loc.count() else ""


def test_step_slider_grows_the_cache(lab08):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, token = lab08
    FIGURES.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
            kernel_idle = ("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                           " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
                           " return !!k && k.status === 'idle'; }")
            wait_until(lambda: page.evaluate(kernel_idle), 90, "an idle kernel", page)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            wait_until(lambda: "step 0 (prefill)" in summary(page), 180, "the cache widget", page)
            wait_until(lambda: page.evaluate(kernel_idle), 180, "the kernel to finish", page)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Error")
            assert errors.count() == 0, errors.first.inner_text()

            before = summary(page)
            n0 = int(re.search(r"(\d+) positions cached", before).group(1))
            slider = page.locator(".widget-slider", has_text="step").first
            slider.scroll_into_view_if_needed()
            box = page.locator(".jp-OutputArea-output", has=slider).first
            img_before = box.locator("img").first.get_attribute("src")
            box.screenshot(path=str(FIGURES / "browser_08_before.png"))

            handle = slider.locator(".noUi-handle").first
            handle.focus()
            for _ in range(5):
                page.keyboard.press("ArrowRight")
            after = wait_until(lambda: (t := summary(page)).startswith("step 5 (decode)") and t, 60,
                               "the step to move", page)
            wait_until(lambda: box.locator("img").first.get_attribute("src") != img_before, 30, "a new figure", page)
            page.wait_for_timeout(500)
            box.screenshot(path=str(FIGURES / "browser_08_after.png"))
            assert f"{n0 + 5} positions cached" in after
            formula, allocated = re.search(r"formula ([\d,]+) B = allocated ([\d,]+) B", after).groups()
            assert formula == allocated
        finally:
            browser.close()
    assert (FIGURES / "browser_08_before.png").stat().st_size > 10_000
    assert (FIGURES / "browser_08_after.png").stat().st_size > 10_000
