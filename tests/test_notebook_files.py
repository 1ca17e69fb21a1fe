"""The notebooks as files: valid nbformat with a unique id on every cell, committed without outputs,
and free of the course plan's internal labels (learners never see the plan)."""
import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_has_cell_ids_and_no_outputs(path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    missing = [i for i, cell in enumerate(raw["cells"]) if "id" not in cell]
    assert not missing, f"cells {missing} have no id: give each a short unique id (nbformat 4.5)"
    ids = [cell["id"] for cell in raw["cells"]]
    assert len(set(ids)) == len(ids), f"cell ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}"
    nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))
    ran = [i for i, cell in enumerate(raw["cells"]) if cell["cell_type"] == "code"
           and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not ran, f"cells {ran} carry outputs or an execution count: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_course_plan_labels(path):
    text = "".join("".join(cell["source"]) for cell in json.loads(path.read_text(encoding="utf-8"))["cells"])
    labels = sorted(set(re.findall(r"\b[SN]\d{1,2}\b", text)))
    assert not labels, f"plan labels {labels} appear in the notebook: state the claim itself instead"
    assert not re.search(r"(?i)\bseed (article|point|text)s?\b", text), \
        "the notebook refers to the seed articles, which learners do not have"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 14, [p.name for p in NOTEBOOKS]
