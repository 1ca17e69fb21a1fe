"""Figures and the widget of notebook 13: schedules, compute vs all-reduce, the sharding picture."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from course_lib import parallel as P  # noqa: E402
from course_lib.errors import InputError  # noqa: E402
from course_lib.viz import parallel as vp  # noqa: E402
from course_lib.widgets import parallel as wp  # noqa: E402


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_fill()]


def _hatched(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]


def test_schedule_figure_draws_one_bar_per_interval_and_the_idle_gaps():
    fig = vp.schedule_figure(P.ideal_schedule(3, 4), 3, unit="steps", title="t")
    ax = fig.axes[0]
    assert len(_bars(ax)) == 12
    # stage s is idle s steps before and (2 - s) steps after its work: 2 gaps for stage 1, 1 for 0 and 2
    assert len(_hatched(ax)) == 4
    assert sum(p.get_width() for p in _hatched(ax)) == pytest.approx(3 * 6 - 12)
    assert ax.get_xlim() == (0, 6)
    assert sorted(t.get_text() for t in ax.texts) == sorted([str(j) for j in range(4)] * 3)
    plt.close(fig)


def test_schedule_figure_in_ms_and_bad_input():
    rows = [(0, 0, 0.0, 0.010), (1, 0, 0.010, 0.030)]
    fig = vp.schedule_figure(rows, 2)
    assert fig.axes[0].get_xlim() == pytest.approx((0, 30))
    assert "ms" in fig.axes[0].get_xlabel()
    plt.close(fig)
    with pytest.raises(InputError):
        vp.schedule_figure([], 2)
    with pytest.raises(InputError):
        vp.schedule_figure([(2, 0, 0.0, 1.0)], 2)


def test_schedules_figure_one_panel_per_run_with_measured_and_formula_bubble():
    runs = [{"n_micro": m, "intervals": [(s, j, (s + j) * 0.01, (s + j + 1) * 0.01) for s in range(2) for j in range(m)]}
            for m in (1, 4)]
    fig = vp.schedules_figure(runs, 2, ideal=P.ideal_bubble)
    assert len(fig.axes) == 2
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert "0.50" in titles[0] and "0.20" in titles[1]
    assert fig.axes[0].get_xlim() == fig.axes[1].get_xlim()          # a shared time axis
    plt.close(fig)
    with pytest.raises(InputError):
        vp.schedules_figure([], 2)


def test_tp_split_figure_stacks_compute_transfer_waiting():
    rows = [{"T": T, "compute": 0.002 * T, "all_reduce": 0.003, "transfer": 0.001, "waiting": 0.002,
             "bytes_per_allreduce": T * 128 * 4, "n_allreduce": 8} for T in (16, 64)]
    fig = vp.tp_split_figure({"a": rows, "b": rows}, [{"bytes": 4096, "seconds": 1e-4}, {"bytes": 1 << 22, "seconds": 1e-3}])
    assert len(fig.axes) == 3
    ax_t = fig.axes[0]
    assert len(ax_t.patches) == 2 * 2 * 3                         # models × lengths × (compute, transfer, waiting)
    heights = sorted({round(p.get_height(), 6) for p in ax_t.patches})
    assert heights == sorted({32.0, 128.0, 1.0, 2.0})
    assert len(fig.axes[1].patches) == 4
    plt.close(fig)
    fig = vp.tp_split_figure({"a": [{k: v for k, v in rows[0].items() if k not in ("transfer", "waiting")}]})
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 2
    plt.close(fig)
    with pytest.raises(InputError):
        vp.tp_split_figure({})


def test_tp_sharding_figure_colours_one_block_per_rank():
    fig = vp.tp_sharding_figure(4, 2)
    ax = fig.axes[0]
    drawn = [p for p in ax.patches if p.get_width() > 0]
    assert len(drawn) == 2 * 3 + 2 + 2 + 2                          # q|k|v columns, W_o rows, W_fc, W_proj
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rank 0", "rank 1"]
    plt.close(fig)
    with pytest.raises(InputError):
        vp.tp_sharding_figure(4, 3)


def test_pipeline_view_and_explorer():
    v = wp.pipeline_view(3, 5)
    assert v["bubble"] == pytest.approx(2 / 7) and v["formula"] == pytest.approx(2 / 7)
    assert v["makespan"] == 7 and len(v["intervals"]) == 15
    assert "p = 3" in wp.pipeline_summary(v)
    with pytest.raises(InputError):
        wp.pipeline_view(0, 5)
    with pytest.raises(InputError):
        wp.pipeline_view(2, 65)
    ex = wp.PipelineExplorer(n_stages=2, n_micro=1)
    assert ex.message is None and "0.500" in ex.summary and ex.image.value[:4] == b"\x89PNG"
    ex.micro.value = 3                                               # the slider's callback redraws
    assert "0.250" in ex.summary and ex.view["n_micro"] == 3
    ex.stages.value = 4
    assert ex.view["n_stages"] == 4 and f"{3 / 6:.3f}" in ex.summary


def test_make_figures_draws_the_static_parallel_figures(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", path)
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    names = ["tp_sharding", "pipeline_bubble_ideal"]
    assert {"pipeline_schedule_measured", "chunk_pipeline_measured", *names} <= set(mf.FIGURE_FUNCTIONS)
    assert mf.main(["--out", str(tmp_path), "--only", *names]) == 0
    for n in names:
        assert (tmp_path / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
