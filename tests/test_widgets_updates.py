"""Every widget of notebooks 01-10 builds its figure once and then updates it.

A slider move must reuse the same Figure object (no new figure: ``plt.figure``/``plt.subplots``
are made to fail during the move) and must really change what is shown: the image data or bar
heights of the kept artists, and the PNG bytes handed to the page. A tiny random model keeps this
fast; notebook 03's query slider also follows a prompt that grows.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import random_model  # noqa: E402

from course_lib import GPT, GPTConfig  # noqa: E402
from course_lib.viz.attention import heatmap, update_heatmap  # noqa: E402
from course_lib.viz.graph import draw_layer_graph, layer_graph, update_layer_graph  # noqa: E402
from course_lib.viz.ops import draw_op_bars, update_op_bars  # noqa: E402
from course_lib.errors import InputError  # noqa: E402
from course_lib.widgets import attention as wa  # noqa: E402
from course_lib.widgets.block import BlockExplorer  # noqa: E402
from course_lib.widgets.cache import build_cache_widget, record_decode  # noqa: E402
from course_lib.widgets.embeddings import EmbeddingExplorer, embedding_summary  # noqa: E402
from course_lib.widgets.graph import build_graph_widget, waits_for  # noqa: E402
from course_lib.widgets.perf import build_timing_widget, timing_series  # noqa: E402
from course_lib.widgets.prefill import attention_share, build_op_widget, op_rows  # noqa: E402
from course_lib.widgets.training import LiveLossCurve  # noqa: E402

PROMPT = "The for statement is used to iterate"


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    return GPT(cfg).eval()


@pytest.fixture
def no_new_figures(monkeypatch):
    """Inside the ``with`` block any attempt to make a new figure fails."""
    class Guard:
        def __enter__(self):
            def refuse(*a, **k):
                raise AssertionError("a new figure was made during an update")
            for name in ("figure", "subplots"):
                monkeypatch.setattr(plt, name, refuse)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return Guard()


def arrays(images):
    return [np.ma.getdata(im.get_array()).copy() for im in images]


def changed(before, after):
    return any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))


def test_attention_explorer_updates_its_figure(model, tok, no_new_figures):
    ex = wa.AttentionExplorer(model, tok, PROMPT, query_index=1)
    fig, png = ex.fig, bytes(ex.image.value)
    images = list(fig.course_handles["images"].values())
    data, heights = arrays(images), [b.get_height() for b in fig.course_handles["bar"]["bars"]]
    with no_new_figures:
        ex.query.value = 4
        assert ex.message is None
        assert [b.get_height() for b in fig.course_handles["bar"]["bars"]] != heights
        assert fig.course_handles["rows"][0].get_y() == 3.5         # the outlined row moved
        ex.temperature.value = 2.0
        assert ex.message is None and changed(data, arrays(images))
        ex.mask.value = False
        assert ex.message is None
    assert ex.fig is fig and bytes(ex.image.value) != png
    weights = ex.views["steps"]["weights"].numpy()
    assert np.allclose(np.ma.getdata(fig.course_handles["images"]["weights"].get_array()), weights)


def test_a_query_move_draws_only_what_moves(model, tok, monkeypatch):
    """Moving the query pastes the kept background and draws the outlines, bars and title over
    it: no full drawing of the figure, and the picture equals a full drawing of the same state."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    ex = wa.AttentionExplorer(model, tok, PROMPT, query_index=1)
    full_draws = []
    real_draw = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda self: (full_draws.append(1), real_draw(self))[1])
    ex.query.value = 4
    assert ex.message is None and full_draws == [], "a query move drew the whole figure again"
    moved = np.asarray(Image.open(io.BytesIO(ex.image.value)))
    ex._background = None                     # force a full drawing of the same state
    ex.update()
    assert full_draws == [1]
    redrawn = np.asarray(Image.open(io.BytesIO(ex.image.value)))
    assert moved.shape == redrawn.shape and np.array_equal(moved, redrawn)
    ex.temperature.value = 2.0                # the weights change: the background is drawn again
    assert full_draws == [1, 1]


def test_query_slider_follows_a_growing_prompt(model, tok):
    ex = wa.AttentionExplorer(model, tok, "a b c", query_index=1)
    assert ex.query.max == 2
    ex.prompt.value = PROMPT + " over a list"
    n = len(tok.encode(ex.prompt.value))
    assert ex.query.max == n - 1 and ex.message is None
    ex.query.value = ex.query.max                   # what the End key asks for
    assert ex.views["query_index"] == n - 1
    assert ex.query.layout.width                    # a set width: it cannot collapse in a row


def test_qkv_and_head_explorers_update_their_figures(model, tok, no_new_figures):
    q = wa.QKVExplorer(model, tok, PROMPT)
    h = wa.HeadExplorer(model, tok, PROMPT)
    q_fig, h_fig = q.fig, h.fig
    q_data = arrays(q_fig.course_handles["images"])
    h_data = arrays(h_fig.course_handles["heads"])
    box_x = h_fig.course_handles["box"].get_x()
    with no_new_figures:
        q.layer.value = 1
        h.head.value = 2
        assert h_fig.course_handles["box"].get_x() != box_x      # the chosen head's columns moved
        h.layer.value = 1
    assert q.message is None and h.message is None
    assert q.fig is q_fig and h.fig is h_fig
    assert changed(q_data, arrays(q_fig.course_handles["images"]))
    assert changed(h_data, arrays(h_fig.course_handles["heads"]))


def test_a_new_prompt_redraws_into_the_same_figure(model, tok):
    ex = wa.AttentionExplorer(model, tok, PROMPT, query_index=1)
    fig = ex.fig
    ex.prompt.value = "a b c"
    assert ex.message is None and ex.fig is fig
    assert fig.course_handles["images"]["weights"].get_array().shape == (3, 3)


def test_embedding_and_block_explorers_update_their_figures(model, tok, no_new_figures):
    e = EmbeddingExplorer(model, tok, "A list is a set.")
    b = BlockExplorer(model, tok, PROMPT)
    e_fig, b_fig = e.fig, b.fig
    e_data = arrays(e_fig.course_handles["images"])
    heights = [bar.get_height() for bar in b_fig.course_handles["bars"]["MLP adds"]]
    with no_new_figures:
        e.prompt.value = "A set is a list."          # as many tokens: new values, same figure
        b.layer.value = 1
    assert len(tok.encode("A set is a list.")) == len(tok.encode("A list is a set."))
    assert e.message is None and b.message is None and e.fig is e_fig and b.fig is b_fig
    assert changed(e_data, arrays(e_fig.course_handles["images"]))
    assert [bar.get_height() for bar in b_fig.course_handles["bars"]["MLP adds"]] != heights
    assert "\n" not in e.summary and e.summary.startswith(f"{len(e.views['ids'])} tokens")


def test_embedding_summary_is_one_short_line(model, tok):
    views = {"ids": list(range(40)), "sum": torch.zeros(40, 8)}
    line = embedding_summary(views)
    assert "\n" not in line and len(line) < 120 and line.endswith("…")


def test_cache_widget_updates_its_figure(no_new_figures):
    cfg = GPTConfig(vocab_size=60, n_positions=32, n_embd=24, n_layer=3, n_head=3)
    box = build_cache_widget(record_decode(random_model(cfg), [[5, 9, 2, 7]], n_new=6))
    fig, png = box.fig, bytes(box.children[3].value)
    h = fig.course_handles
    rows, heights = arrays([h["rows"]]), [b.get_height() for b in h["bars"]]
    step = box.children[0].children[0]
    with no_new_figures:
        step.value = 4
    assert box.fig is fig and bytes(box.children[3].value) != png
    assert changed(rows, arrays([h["rows"]]))
    assert [b.get_height() for b in h["bars"]] != heights
    assert sum(b.get_height() > 0 for b in h["bars"]) == 4 + 4          # 8 cached keys at step 4


def test_timing_widget_updates_its_figure_and_offers_only_curves(no_new_figures):
    results = {"ttft": {1: .001, 4: .002, 16: .004, 64: .01}, "tpot": {}}
    for b in (1, 4, 16, 64):
        results["tpot"][(b, 64)] = .001 * b
    for b in (1, 16):
        for c in (32, 128, 256):
            results["tpot"][(b, c)] = .001 * b * (1 + c / 100)
    box = build_timing_widget(results)
    view, fixed = box.children[0].children
    fig = box.fig
    line = fig.axes[0].lines[0]
    y0 = list(line.get_ydata())
    with no_new_figures:
        for v in ("tpot_context", "tpot_batch"):
            view.value = v
            for opt in fixed.options:
                fixed.value = opt
                assert len(timing_series(results, v, opt)["x"]) >= 3     # every position: a curve
                assert list(line.get_xdata()) == timing_series(results, v, opt)["x"]
    assert box.fig is fig and list(line.get_ydata()) != y0
    assert list(fixed.options) == [64]                    # the only context measured at 3+ batches
    view.value = "tpot_context"
    assert list(fixed.options) == [1, 16]                 # batches 4 and 64: one point each, left out
    assert view.layout.width                              # wide enough for its labels


def test_live_loss_curve_keeps_one_figure(no_new_figures):
    live = LiveLossCurve(total_steps=50, every=1, min_seconds=0.0, vocab_size=60)
    live(0, 4.0)
    fig = live.fig
    with no_new_figures:
        for s in range(1, 10):
            live(s, 4.0 - s / 10, 3.9 if s == 5 else None)
    assert live.fig is fig and len(live.fig.axes[0].lines[0].get_xdata()) == 10
    assert list(live.fig.axes[0].lines[2].get_xdata()) == [5]


def test_update_heatmap_values_and_shapes():
    fig, ax = plt.subplots()
    im = heatmap(ax, np.array([[1.0, -np.inf], [0.5, 2.0]]), ["a", "b"], ["a", "b"])
    texts = [t.get_text() for _, _, t in im.cell_texts]
    assert texts == ["1.00", "−∞", "0.50", "2.00"]
    update_heatmap(im, np.array([[3.0, 1.0], [-np.inf, 0.0]]))
    assert [t.get_text() for _, _, t in im.cell_texts] == ["3.00", "1.00", "−∞", "0.00"]
    assert im.get_clim() == (0.0, 3.0)
    with pytest.raises(InputError, match="draw a new one"):
        update_heatmap(im, np.zeros((3, 3)))
    im2 = heatmap(ax, np.zeros((2, 5)), annotate=False)
    update_heatmap(im2, np.ones((4, 5)), row_labels=list("abcd"))
    assert im2.get_array().shape == (4, 5) and ax.get_ylim() == (3.5, -0.5)
    plt.close(fig)


def test_op_widget_updates_its_bars(model, tok, no_new_figures):
    ids = tok.encode(PROMPT)
    box = build_op_widget(model, ids)
    n_tokens, layer = box.children[0].children
    fig, png = box.fig, bytes(box.children[2].value)
    h = fig.course_handles
    widths = [b.get_width() for b in h["flops"]]
    with no_new_figures:
        n_tokens.value = 3
        layer.value = 1
    rows = op_rows(model, ids, 3, 1)
    assert box.fig is fig and bytes(box.children[2].value) != png
    assert [b.get_width() for b in h["flops"]] == [max(r.flops, 1) for r in rows] != widths
    assert [b.get_width() for b in h["bytes"]] == [r.bytes for r in rows]
    assert h["suptitle"].get_text().startswith("layer 1, prefill of T = 3 tokens")
    assert f"{attention_share(rows):.3f}" in box.children[1].value
    assert fig.get_layout_engine() is None               # one drawing pass per PNG, not two
    with pytest.raises(InputError, match="n_tokens"):
        op_rows(model, ids, len(ids) + 1)
    with pytest.raises(InputError, match="other ops"):
        update_op_bars(fig, rows[:-1], "x")


def test_op_bars_static_figure_shows_the_table(model, tok):
    rows = op_rows(model, tok.encode(PROMPT), 5)
    fig = draw_op_bars(rows, "t")
    assert [b.get_width() for b in fig.course_handles["bytes"]] == [r.bytes for r in rows]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [r.op for r in rows]
    plt.close(fig)
    with pytest.raises(InputError, match="at least one op"):
        draw_op_bars([], "t")


def faces(fig):
    return {n: b.get_bbox_patch().get_facecolor() for n, b in fig.course_handles["boxes"].items()}


def test_graph_widget_recolours_its_nodes(no_new_figures):
    names = list("ABCD")
    box = build_graph_widget(names, node=("ffn", 2), causal=True)
    step, mask = box.children[0].children
    fig, png = box.fig, bytes(box.children[2].value)
    arrows = fig.course_handles["arrows"]
    before = faces(fig)
    orange = matplotlib.colors.to_rgba("tab:orange")
    assert before[("x", 2)] == orange and before[("x", 3)] != orange       # C waits for x[C], not x[D]
    hidden = [e for e, a in arrows.items() if not a.get_visible()]
    assert (("k", 3), ("scores", 0)) in hidden                             # the mask removes D's key from A
    with no_new_figures:
        step.value = ("q", 3)
    assert box.fig is fig and bytes(box.children[2].value) != png
    after = faces(fig)
    assert after != before and [n for n, f in after.items() if f == orange] == [("x", 3)]
    assert "['D']" in box.children[1].value
    with no_new_figures:
        mask.value = False
        step.value = ("ffn", 0)
    assert all(a.get_visible() for a in arrows.values())                   # no mask: every arrow
    assert {n for n, f in faces(fig).items() if f == orange} >= {("x", t) for t in range(4)}
    assert waits_for(layer_graph(names, causal=False), ("ffn", 0)) == names
    assert box.fig is fig


def test_layer_graph_update_needs_the_arrows_of_the_unmasked_graph():
    names = list("ABC")
    fig = draw_layer_graph(layer_graph(names, causal=True))
    with pytest.raises(InputError, match="arrows_of"):
        update_layer_graph(fig, layer_graph(names, causal=False))
    with pytest.raises(InputError, match="other tokens"):
        update_layer_graph(fig, layer_graph(list("AB")))
    with pytest.raises(InputError, match="highlight"):
        update_layer_graph(fig, layer_graph(names), highlight=("ffn", 7))
    plt.close(fig)
