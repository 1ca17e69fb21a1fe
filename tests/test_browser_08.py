"""A real browser drives notebook 08 in JupyterLab: run all cells, move the step slider of the KV
cache widget, and check that the cache grows on the page and the bytes stay equal to the formula.

Uses the server helpers of tests/test_browser.py on a temporary copy of notebook 08. Screenshots go
to ``figures/browser_08_before.png`` and ``figures/browser_08_after.png``. Skipped when Chromium
or Playwright is missing.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
from test_browser import CHROMIUM, FIGURES, MOVE_BOUND_S, jupyter_lab, run_all_cells, time_moves, wait_until

NOTEBOOK = "08_decode_and_kv_cache.ipynb"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def lab08(tmp_path):
    """A JupyterLab server on a copy of notebook 08; yields (base_url, token)."""
    with jupyter_lab(tmp_path, NOTEBOOK) as server:
        yield server


def summary(page) -> str:
    loc = page.locator(".widget-html", has_text="positions cached")
    return loc.first.inner_text() if loc.count() else ""


def test_step_slider_grows_the_cache(lab08):
    ready = lambda page: "step 0 (prefill)" in summary(page)  # noqa: E731
    with run_all_cells(lab08, NOTEBOOK, ready, "the cache widget") as page:
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

        times = time_moves(page, handle, box.locator("img").first, n=7)
        median = statistics.median(times)
        print(f"notebook 08: key press → new figure, median {median:.3f} s over {len(times)} moves "
              f"(each: {', '.join(f'{t:.2f}' for t in times)})")
        assert summary(page).startswith("step 12 (decode)")
        box.screenshot(path=str(FIGURES / "browser_08_moves.png"))
        assert median < MOVE_BOUND_S, times
    assert (FIGURES / "browser_08_before.png").stat().st_size > 10_000
    assert (FIGURES / "browser_08_after.png").stat().st_size > 10_000
