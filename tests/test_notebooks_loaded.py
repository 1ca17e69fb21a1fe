"""The notebooks that time things still pass while another process keeps a CPU core busy.

Timing claims are the ones a busy machine can flip, so each of them takes the best of repeats and
compares quantities that differ by a clear factor. This test holds them to that: it starts a
process that burns one core, runs each timing notebook under nbval beside it (one at a time, in
its own pytest), and requires it to pass. Marked ``loaded``: ``make test`` runs it after the rest,
on its own, so that the burner is the only other load. About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMING_NOTEBOOKS = ["00_start_here.ipynb", "02_q_k_v.ipynb", "07_prefill.ipynb",
                    "08_decode_and_kv_cache.ipynb", "10_prefill_vs_decode_on_your_hardware.ipynb"]

pytestmark = pytest.mark.loaded


@pytest.fixture(scope="module")
def cpu_burner():
    """A process that spins on one core until the module's tests are done."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("notebook", TIMING_NOTEBOOKS)
def test_timing_notebook_passes_beside_a_busy_core(cpu_burner, notebook):
    assert cpu_burner.poll() is None, "the CPU burner is not running"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COURSE_TIMING_THREADS", None)          # the notebooks choose their threads as a learner's would
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval-lax",
                          "--nbval-current-env", str(ROOT / "notebooks" / notebook)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert cpu_burner.poll() is None, "the CPU burner stopped during the run"
    assert run.returncode == 0, f"{notebook} failed beside a busy core:\n{run.stdout[-4000:]}"
