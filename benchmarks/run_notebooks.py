"""Execute notebooks top to bottom and keep the executed copies (for a GPU machine without Jupyter's CLI).

    COURSE_SAVE_FIGURES=1 python benchmarks/run_notebooks.py notebooks/07_prefill.ipynb ... --out DIR

Each notebook runs in a fresh kernel with cwd = notebooks/; a failing cell (an assert) stops that
notebook and is reported. Executed notebooks go to DIR so their printed measurements can be read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in map(Path, a.notebooks):
        nb = nbformat.read(path, as_version=4)
        started = {}

        def on_start(cell, cell_index, **_):
            started[cell_index] = time.perf_counter()
            print(f"  {path.name} cell {cell_index} starts", flush=True)

        def on_complete(cell, cell_index, **_):
            secs = time.perf_counter() - started.get(cell_index, time.perf_counter())
            if secs > 2:
                print(f"  {path.name} cell {cell_index}: {secs:.1f} s", flush=True)

        client = NotebookClient(nb, timeout=a.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}},
                                on_cell_start=on_start, on_cell_complete=on_complete)
        t = time.perf_counter()
        try:
            client.execute()
            status = "ok"
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            status = "FAILED: " + str(e).strip().splitlines()[-1][:300]
            failed += 1
        nbformat.write(nb, out / path.name)
        print(f"{path.name}: {status} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
