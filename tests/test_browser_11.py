"""A real browser drives notebook 11 in JupyterLab: run all cells, move the step slider of the paged
KV pool widget, and check that the block grid on the page changes with it.

Uses the server helpers of tests/test_browser.py on a temporary copy of notebook 11. Screenshots go
to ``figures/browser_11_before.png`` and ``figures/browser_11_after.png``. Skipped when Chromium
or Playwright is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_browser import CHROMIUM, FIGURES, jupyter_lab, run_all_cells, wait_until

NOTEBOOK = "11_inside_an_engine.ipynb"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def lab11(tmp_path):
    """A JupyterLab server on a copy of notebook 11; yields (base_url, token)."""
    with jupyter_lab(tmp_path, NOTEBOOK) as server:
        yield server


def pool_text(page) -> str:
    """What the pool widget prints: the step, the blocks held and every request's block table."""
    loc = page.locator(".jp-OutputArea-output pre", has_text="block tables:")
    return loc.first.inner_text() if loc.count() else ""


def test_step_slider_changes_the_block_grid(lab11):
    ready = lambda page: pool_text(page).startswith("step 0:")  # noqa: E731
    with run_all_cells(lab11, NOTEBOOK, ready, "the paged pool widget") as page:
        before = pool_text(page)
        held_before = int(re.search(r"(\d+) of \d+ blocks held", before).group(1))
        slider = page.locator(".widget-slider", has_text="step").first
        slider.scroll_into_view_if_needed()
        box = page.locator(".jp-OutputArea-output", has=slider).first
        img_before = box.locator("img").first.get_attribute("src")
        box.screenshot(path=str(FIGURES / "browser_11_before.png"))

        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for _ in range(8):
            page.keyboard.press("ArrowRight")
        after = wait_until(lambda: (t := pool_text(page)).startswith("step 8:") and t, 90, "the step to move", page)
        wait_until(lambda: box.locator("img").first.get_attribute("src") != img_before, 30, "a new block grid", page)
        page.wait_for_timeout(500)
        box.screenshot(path=str(FIGURES / "browser_11_after.png"))
        held_after = int(re.search(r"(\d+) of \d+ blocks held", after).group(1))
        tables_before = before.split("block tables:", 1)[1]
        tables_after = after.split("block tables:", 1)[1]
        assert held_after > held_before            # the requests grew and new ones arrived
        assert tables_after != tables_before
    assert (FIGURES / "browser_11_before.png").stat().st_size > 10_000
    assert (FIGURES / "browser_11_after.png").stat().st_size > 10_000
