"""A real browser drives notebook 03 in JupyterLab: run all cells, move the query-token slider, and
check that the attention weights shown by the widget change.

JupyterLab runs on a free port of 127.0.0.1 with a random token, on a temporary copy of the
notebook; Debian's Chromium (``/usr/bin/chromium``) is driven by Playwright. Screenshots before and
after the slider moves go to ``figures/browser_03_before.png`` and ``figures/browser_03_after.png``.
Skipped when Chromium or Playwright is missing. The server is always stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "03_scores_mask_softmax.ipynb"
CHROMIUM = "/usr/bin/chromium"
FIGURES = ROOT / "figures"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout} s")


@contextmanager
def jupyter_lab(tmp_path: Path, notebook: str):
    """A JupyterLab server on a temporary copy of ``notebook``; yields (base_url, token) and always
    stops the server and its kernels."""
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / notebook, work / notebook)
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # render every cell (no virtual scrolling), so the widget's output is in the page
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    jupyter = Path(sys.executable).parent / "jupyter"
    cmd = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
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
            os.killpg(proc.pid, signal.SIGTERM)          # the server and the kernels it started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of notebook 03; yields (base_url, token)."""
    with jupyter_lab(tmp_path, NOTEBOOK) as server:
        yield server


def widget_text(page) -> str:
    """The text the attention widget prints: its query's row of weights."""
    loc = page.locator(".jp-OutputArea-output pre", has_text="weight on future tokens")
    return loc.first.inner_text() if loc.count() else ""


def wait_until(predicate, timeout: float, what: str, page=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if page is not None:
            page.wait_for_timeout(300)
        else:
            time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def time_moves(page, handle, image, n: int = 6, key: str = "ArrowRight", timeout_ms: int = 30_000) -> list[float]:
    """Press ``key`` on a slider ``n`` times; for each press, the seconds until the widget's
    image (``<img>`` element) shows a new picture (its ``src`` changes), polled in the page."""
    times = []
    for _ in range(n):
        src = image.get_attribute("src")
        handle.focus()
        t0 = time.perf_counter()
        page.keyboard.press(key)
        page.wait_for_function("([el, s]) => el.getAttribute('src') !== s", arg=[image.element_handle(), src],
                               polling=10, timeout=timeout_ms)
        times.append(time.perf_counter() - t0)
        wait_until(lambda: page.evaluate(KERNEL_IDLE), 30, "the kernel to be idle", page)
    return times


#: A loaded 2-core machine keeps a slider move under this (median, key press to new picture; 0.27 s
#: measured with three other agents loading the 2 cores, 0.8-1 s before the query slider blitted).
MOVE_BOUND_S = float(os.environ.get("COURSE_BROWSER_MOVE_BOUND_S", "0.5"))


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
KERNEL_IDLE = ("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
               " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
               " return !!k && k.status === 'idle'; }")


@contextmanager
def run_all_cells(server, notebook: str, ready, what: str):
    """Open ``notebook`` in Chromium, run all cells, wait until ``ready(page)`` and an idle kernel,
    check that no cell printed an error; yields the page. The browser is always closed."""
    sync_api = pytest.importorskip("playwright.sync_api")
    base, token = server
    FIGURES.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{notebook}?token={token}", wait_until="domcontentloaded")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
            wait_until(lambda: page.evaluate(KERNEL_IDLE), 90, "an idle kernel", page)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # every cell has run once the widget is on the page and the kernel is idle again
            wait_until(lambda: ready(page), 180, what, page)
            wait_until(lambda: page.evaluate(KERNEL_IDLE), 180, "the kernel to finish", page)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Error")
            assert errors.count() == 0, errors.first.inner_text()
            yield page
        finally:
            browser.close()


def test_query_slider_changes_the_weights(lab):
    ready = lambda page: "weight on future tokens" in widget_text(page)  # noqa: E731
    with run_all_cells(lab, NOTEBOOK, ready, "the attention widget") as page:
        before = widget_text(page)
        m = re.search(r"query (\d+) ", before)
        assert m, before
        q_before = int(m.group(1))
        slider = page.locator(".widget-slider", has_text="query token").first
        slider.scroll_into_view_if_needed()
        box = page.locator(".jp-OutputArea-output", has=slider).first
        img_before = box.locator("img").first.get_attribute("src")
        box.screenshot(path=str(FIGURES / "browser_03_before.png"))

        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for _ in range(2):
            page.keyboard.press("ArrowRight")
        after = wait_until(lambda: (t := widget_text(page)) != before and f"query {q_before + 2} " in t and t,
                           60, "the weights to change", page)
        wait_until(lambda: box.locator("img").first.get_attribute("src") != img_before, 30, "a new figure", page)
        page.wait_for_timeout(500)
        box.screenshot(path=str(FIGURES / "browser_03_after.png"))

        weights_before = before.split("weights", 1)[1].split("\n")[0]
        weights_after = after.split("weights", 1)[1].split("\n")[0]
        assert weights_after != weights_before
        assert "weight on future tokens: 0.000" in after    # the mask is still on
    assert (FIGURES / "browser_03_before.png").stat().st_size > 10_000
    assert (FIGURES / "browser_03_after.png").stat().st_size > 10_000


def test_attention_widget_answers_fast_and_fits_a_small_window(lab):
    """Slider moves answer in well under a second; the sliders keep their width in a 1,024 px
    window; after a longer prompt the End key reaches the new last token."""
    import statistics

    from course_lib.tiny import load_tokenizer

    ready = lambda page: "weight on future tokens" in widget_text(page)  # noqa: E731
    with run_all_cells(lab, NOTEBOOK, ready, "the attention widget") as page:
        page.set_viewport_size({"width": 1024, "height": 900})
        slider = page.locator(".widget-slider", has_text="query token").first
        slider.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        for name in ("query token", "temperature", "layer", "head"):
            track = page.locator(".widget-slider", has_text=name).first.locator(".slider-container").first
            width = track.bounding_box()["width"]
            assert width > 80, f"the {name} slider is {width:.0f} px wide in a 1,024 px window"
        box = page.locator(".jp-OutputArea-output", has=slider).first
        image = box.locator("img").first
        handle = slider.locator(".noUi-handle").first
        page.evaluate("() => window.scrollBy(0, 0)")
        handle.focus()
        page.keyboard.press("Home")
        wait_until(lambda: "query 0 " in widget_text(page), 30, "the first query", page)
        times = time_moves(page, handle, image, n=7)
        median = statistics.median(times)
        print(f"notebook 03: key press → new figure, median {median:.3f} s over {len(times)} moves "
              f"(each: {', '.join(f'{t:.2f}' for t in times)})")
        box.screenshot(path=str(FIGURES / "browser_03_moves.png"))
        assert median < MOVE_BOUND_S, times

        longer = "The for statement is used to iterate over the elements of a list, a tuple or a string."
        n_tokens = len(load_tokenizer().encode(longer))
        text_box = box.locator(".widget-text input").first
        text_box.fill(longer)
        text_box.press("Enter")
        wait_until(lambda: longer[:20] in page.locator(".widget-text input").first.input_value()
                   and page.evaluate(KERNEL_IDLE), 30, "the new prompt", page)
        # the widget puts a new query slider in for a prompt of another length: wait until the page
        # shows it (its maximum is the new last token) before pressing End on it
        wait_until(lambda: handle.get_attribute("aria-valuemax") in (f"{n_tokens - 1}", f"{n_tokens - 1}.0"), 30,
                   "the new query slider", page)

        def end_reaches_last():          # a key press that lands while the page re-renders is pressed again
            if f"query {n_tokens - 1} " in widget_text(page):
                return True
            handle.focus()
            page.keyboard.press("End")
            return False
        try:
            wait_until(end_reaches_last, 30, f"the End key to reach query {n_tokens - 1}", page)
        except TimeoutError:
            box.screenshot(path=str(FIGURES / "browser_03_end.png"))
            raise AssertionError(f"after End: {widget_text(page)[:160]!r}; handle aria-valuemax "
                                 f"{handle.get_attribute('aria-valuemax')}, prompt box "
                                 f"{text_box.input_value()[:40]!r}") from None
        box.screenshot(path=str(FIGURES / "browser_03_end.png"))
    assert (FIGURES / "browser_03_moves.png").stat().st_size > 10_000
