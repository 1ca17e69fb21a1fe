"""Roofline, dependency graph and timing views: the data behind each picture is checked."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import random_model  # noqa: E402

from course_lib.config import GPTConfig  # noqa: E402
from course_lib.dependencies import raw_score_rows_changed, token_dependencies  # noqa: E402
from course_lib.errors import InputError  # noqa: E402
from course_lib.perf import Ceilings  # noqa: E402
from course_lib.viz.graph import STAGES, draw_layer_graph, layer_graph  # noqa: E402
from course_lib.viz.roofline import bound_of, plot_roofline, roof_curve  # noqa: E402
from course_lib.widgets.perf import VIEWS, build_timing_widget, draw_timing, timing_series  # noqa: E402

CEIL = Ceilings("cpu", "test cpu", "float32", peak_flops=100e9, bandwidth=20e9, matmul_n=1, copy_bytes=1)


def test_roof_curve_is_the_minimum_of_the_two_roofs():
    y = roof_curve(100e9, 20e9, [0.5, 5, 50])
    assert np.allclose(y, [10e9, 100e9, 100e9])
    assert CEIL.ridge == 5
    assert bound_of(CEIL, 0.5) == "memory-bound" and bound_of(CEIL, 50) == "compute-bound"
    with pytest.raises(InputError):
        roof_curve(0, 1, [1])


def test_plot_roofline_draws_every_point():
    pts = [dict(intensity=0.5, flops_per_s=5e9, label="decode b=1", kind="decode"),
           dict(intensity=60, flops_per_s=70e9, label="prefill 256", kind="prefill")]
    fig = plot_roofline(CEIL, pts)
    ax = fig.axes[0]
    xs = sorted(float(line.get_xdata()[0]) for line in ax.lines if line.get_linestyle() == "None")
    assert xs == [0.5, 60]
    assert "test cpu" in ax.get_title()
    plt.close(fig)
    with pytest.raises(InputError, match="positive"):
        plot_roofline(CEIL, [dict(intensity=0, flops_per_s=1)])


def test_layer_graph_edges():
    g = layer_graph("ABCD")
    assert g.depends_on_tokens("q") == [[i == j for j in range(4)] for i in range(4)]
    assert g.depends_on_tokens("scores") == [[j <= i for j in range(4)] for i in range(4)]
    assert g.depends_on_tokens("ffn") == [[j <= i for j in range(4)] for i in range(4)]
    # the cross-token edges: keys into scores, values into the weighted sum, j < i only
    assert len(g.sync_edges()) == 2 * (0 + 1 + 2 + 3)
    assert {b[0] for _, b in g.sync_edges()} == {"scores", "aggregate"}
    full = layer_graph("ABCD", causal=False)
    assert full.depends_on_tokens("softmax") == [[True] * 4] * 4
    assert len(full.sync_edges()) == 2 * 4 * 3
    fig = draw_layer_graph(g, highlight=("ffn", 2))
    assert len(fig.axes[0].texts) == len(STAGES) * 4
    plt.close(fig)
    with pytest.raises(InputError):
        layer_graph([])


def test_measured_dependencies_match_the_graph():
    cfg = GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    m = random_model(cfg)
    g = layer_graph("ABCDE")
    for layer in range(2):
        d = token_dependencies(m, torch.tensor([[3, 1, 4, 1, 5]]), layer)
        for stage in d:
            want = g.depends_on_tokens(stage)
            got = d[stage]
            if stage == "softmax":   # row 0 is softmax over one key: always exactly [1.0]
                assert got[0] == [False] * 5
                got, want = got[1:], want[1:]
            assert got == want, stage
    assert raw_score_rows_changed(m, [[3, 1, 4, 1, 5]]) == [True] * 5


TIMES = {"ttft": {1: 0.005, 16: 0.02, 256: 0.2},
         "tpot": {(1, 32): 0.006, (1, 448): 0.008, (16, 32): 0.02, (16, 448): 0.08}}


def test_timing_series_and_widget():
    s = timing_series(TIMES, "ttft_per_token")
    assert s["x"] == [1, 16, 256] and s["y"][0] == pytest.approx(5.0) and s["y"][2] == pytest.approx(0.2 * 1e3 / 256)
    s = timing_series(TIMES, "tpot_context", 16)
    assert s["x"] == [32, 448] and s["y"] == pytest.approx([20, 80])
    s = timing_series(TIMES, "tpot_batch", 32)
    assert s["tokens_per_s"] == pytest.approx([1 / 0.006, 16 / 0.02])
    for view in VIEWS:
        plt.close(draw_timing(TIMES, view))
    with pytest.raises(InputError, match="no decode timing"):
        timing_series(TIMES, "tpot_context", 4)
    with pytest.raises(InputError):
        timing_series(TIMES, "nothing")
    w = build_timing_widget(TIMES)
    view, fixed = w.children[0].children
    view.value = "tpot_batch"
    assert fixed.description == "context" and list(fixed.options) == [32, 448]
