"""scripts/make_figures.py draws its figures from course_lib into PNG files."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_figures_writes_pngs(tmp_path, capsys):
    mf = load_script()
    names = ["abcd_masked_attention", "pre_ln_block", "training_curve", "newline_head"]
    assert set(names) <= set(mf.FIGURE_FUNCTIONS)
    assert mf.main(["--out", str(tmp_path), "--only", *names]) == 0
    for n in names:
        data = (tmp_path / f"{n}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_make_figures_rejects_unknown_names(tmp_path):
    mf = load_script()
    with pytest.raises(SystemExit):
        mf.main(["--out", str(tmp_path), "--only", "no_such_figure"])
