"""Figures and widgets of notebook 12: built once, artists moved; callbacks without a browser."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from course_lib.errors import InputError  # noqa: E402
from course_lib.tiled import online_softmax_steps, split_kv_decode, tiled_causal_attention  # noqa: E402
from course_lib.viz.tiles import (OnlineSoftmaxFigure, TileGridFigure, draw_tile_grid, plot_kernel_times,  # noqa: E402
                                  plot_skipped_fraction, plot_split_kv)
from course_lib.widgets.tiles import (build_online_softmax_widget, build_tile_grid_widget,  # noqa: E402
                                      online_softmax_summary, online_softmax_view, tile_grid_counts)

rng = np.random.default_rng(3)
Q = rng.normal(size=8)
K, V = rng.normal(size=(2, 40, 8)) * 2


@pytest.fixture(scope="module")
def run():
    return online_softmax_steps(Q, K, V, 8)


def test_online_softmax_view_and_summary(run):
    for step in range(run.n_tiles):
        view = online_softmax_view(run, step, V)
        assert view["keys_seen"] == 8 * (step + 1)
        assert np.allclose(view["output"], view["exact_over_seen"])
        assert view["m"] == view["true_max_over_seen"]
        assert view["max_grew"] == (step > 0 and view["m"] > run.states[step - 1].m)
    line = online_softmax_summary(online_softmax_view(run, 0, V))
    assert line.startswith("after tile 1: 8 keys folded in") and "differs from softmax" in line
    for bad in (-1, run.n_tiles, 1.0):
        with pytest.raises(InputError, match="step must be"):
            online_softmax_view(run, bad, V)


def test_online_softmax_figure_moves_artists(run):
    d = OnlineSoftmaxFigure(run, step=0)
    assert [b.get_facecolor() for b in d.bars[:8]] == [d.bars[0].get_facecolor()] * 8
    assert d.bars[8].get_facecolor() != d.bars[0].get_facecolor()      # tile 2 not yet seen
    d.show_step(2)
    assert d.bars[23].get_facecolor() == d.bars[0].get_facecolor() != d.bars[24].get_facecolor()
    assert np.allclose(d.out_line.get_ydata(), run.states[2].output)
    assert d.max_line.get_ydata()[0] == run.states[2].m
    assert d.title.get_text().startswith("tile 3 of 5: keys 0..23")
    plt.close(d.fig)


def test_online_softmax_widget(run):
    w = build_online_softmax_widget(run, V)
    slider, info, image = w.children
    assert info.value.startswith("after tile 1:") and image.value[:4] == b"\x89PNG"
    first = image.value
    slider.value = 4
    assert info.value.startswith("after tile 5: 40 keys") and image.value != first
    assert np.allclose(w.drawing.out_line.get_ydata(), run.states[4].output)


def test_tile_grid_figure_and_widget():
    q, k, v = rng.normal(size=(3, 64, 4))
    c = tiled_causal_attention(q, k, v, 16)[1]
    fig = draw_tile_grid(c, 16, 16, 64)
    assert "10 of 16 tile pairs" in fig.axes[0].get_title()
    plt.close(fig)
    d = TileGridFigure(c, 16, 16, 64)
    c2 = tile_grid_counts(100, 32)
    d.show(c2, 32, 32, 100)
    assert d.img.get_array().shape == (4, 4) and d.ax.get_xlim() == (0, 100)
    assert len(d.edges.get_segments()) == 10
    plt.close(d.fig)
    w = build_tile_grid_widget(64, 16)
    (length, size), image = w.children[0].children, w.children[1]
    assert w.state["counts"].pairs_total == 16 and image.value[:4] == b"\x89PNG"
    size.value = 8
    assert w.state["counts"].pairs_done == 8 * 9 // 2
    length.value = 128
    assert w.state["counts"].pairs_total == 16 * 16
    with pytest.raises(InputError, match="tile"):
        tile_grid_counts(64, 0)


def test_small_charts():
    fig = plot_skipped_fraction([64, 256], [0.4, 0.48], 32)
    assert fig.axes[0].get_ylim()[1] > 0.5
    plt.close(fig)
    sd = split_kv_decode(rng.normal(size=(2, 8)), rng.normal(size=(64, 2, 8)), rng.normal(size=(64, 2, 8)), 16)
    fig = plot_split_kv(sd, head=1)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert len(heights) == 4 and abs(sum(heights) - 1) < 1e-9
    plt.close(fig)
    fig = plot_kernel_times(["a causal", "b full"], [1e-3, 2e-3], [True, False])
    assert len(fig.axes[0].patches) == 2
    plt.close(fig)


def test_make_figures_draws_the_tile_figures(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("make_figures", root / "scripts" / "make_figures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    names = ["online_softmax_running_max", "causal_tile_grid", "causal_skipped_fraction", "split_kv_decode"]
    assert mf.main(["--out", str(tmp_path), "--only", *names]) == 0
    for n in names:
        data = (tmp_path / f"{n}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
