"""Write a notebook (no outputs) from a percent-format script, and back.

    python scripts/py_to_notebook.py draft.py notebooks/03_scores_mask_softmax.ipynb
    python scripts/py_to_notebook.py --reverse notebooks/03_scores_mask_softmax.ipynb draft.py

Cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown; each line starts with ``# ``).
A code cell whose first line is ``# solution`` is folded away (JupyterLab's source_hidden).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def script_to_cells(text: str) -> list[dict]:
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is None or not body:
            return
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.split("\n"))
            cells.append({"cell_type": "markdown", "metadata": {}, "source": body})
        else:
            meta = {"jupyter": {"source_hidden": True}} if body.startswith("# solution") else {}
            cells.append({"cell_type": "code", "metadata": meta, "source": body,
                          "execution_count": None, "outputs": []})

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def to_notebook(cells: list[dict]) -> dict:
    for c in cells:
        src = c["source"].split("\n")
        c["source"] = [s + "\n" for s in src[:-1]] + [src[-1]]
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (course)", "language": "python"},
                         "language_info": {"name": "python"}}}


def notebook_to_script(nb: dict) -> str:
    out = []
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            out.append("# %% [markdown]\n" + "\n".join("# " + line if line else "#" for line in src.split("\n")))
        else:
            out.append("# %%\n" + src)
    return "\n\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--reverse", action="store_true", help="notebook → script")
    a = ap.parse_args()
    if a.reverse:
        Path(a.dst).write_text(notebook_to_script(json.loads(Path(a.src).read_text())))
    else:
        nb = to_notebook(script_to_cells(Path(a.src).read_text()))
        for i, c in enumerate(nb["cells"]):
            c["id"] = f"c{i:03d}"
        Path(a.dst).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
