"""The attention pictures: they draw what they are given, label it, and refuse malformed input."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib.errors import InputError  # noqa: E402
from course_lib.viz import attention as va  # noqa: E402
from course_lib.viz import block, embeddings, heads, training  # noqa: E402
from course_lib.widgets.attention import attention_steps  # noqa: E402

LABELS = ["A", "B", "C", "D"]


def steps_abcd():
    g = torch.Generator().manual_seed(0)
    return attention_steps(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g))


def test_heatmap_labels_and_masked_cells():
    fig, ax = plt.subplots()
    m = steps_abcd()["masked"]
    im = va.heatmap(ax, m, LABELS, LABELS, title="masked")
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("−∞") == 6              # the upper triangle of a 4 x 4 causal mask
    data = im.get_array()
    assert data.mask.sum() == 6 and not data.mask[np.tril_indices(4)].any()
    plt.close(fig)


def test_heatmap_rejects_wrong_labels_and_shapes():
    fig, ax = plt.subplots()
    with pytest.raises(InputError, match="3 row labels for 4 rows"):
        va.heatmap(ax, np.zeros((4, 4)), LABELS[:3], LABELS)
    with pytest.raises(InputError, match="2-D"):
        va.heatmap(ax, np.zeros((2, 2, 2)))
    plt.close(fig)


def test_steps_figure_has_five_panels_and_a_bar_row():
    fig = va.steps_figure(steps_abcd(), LABELS, query_index=2)
    titles = [ax.get_title() for ax in fig.axes]
    for name in ("scores", "scaled", "mask", "masked", "weights"):
        assert any(t.startswith(name) for t in titles), (name, titles)
    bar_ax = fig.axes[-1]
    heights = [p.get_height() for p in bar_ax.patches]
    expected = steps_abcd()["weights"][2].tolist()
    assert np.allclose(heights, expected)
    assert heights[3] == 0.0                      # D is in C's future
    plt.close(fig)


def test_weights_bar_marks_future_keys_red():
    fig, ax = plt.subplots()
    va.weights_bar(ax, [0.1, 0.2, 0.3, 0.4], LABELS, query_index=1, future_from=2)
    colors = [p.get_facecolor()[:3] for p in ax.patches]
    assert colors[0] == colors[1] != colors[2] == colors[3]
    assert "sum 1.000" in ax.get_title()
    plt.close(fig)


def test_head_grid_and_layer_grid_shapes():
    w = torch.softmax(torch.randn(3, 5, 5), -1)
    fig = va.head_grid(w, list("abcde"), highlight=1)
    assert len(fig.axes) == 3 + 1 and fig.axes[1].spines["left"].get_edgecolor()[:3] == (1.0, 0.0, 0.0)
    assert fig.axes[-1].get_ylabel() == "attention weight"                  # the colour bar
    assert fig.get_figwidth() <= va.MAX_WIDTH_IN
    plt.close(fig)
    fig = va.layer_head_grid(torch.stack([w, w]), list("abcde"))
    assert len(fig.axes) == 6 + 1
    plt.close(fig)
    wide = torch.softmax(torch.randn(12, 70, 70), -1)                       # 12 heads, 70 tokens
    fig = va.head_grid(wide, [f"t{i}" for i in range(70)])
    assert fig.get_figwidth() <= va.MAX_WIDTH_IN + 1e-9
    assert len(fig.axes[0].get_yticklabels()) <= va.MAX_TICK_LABELS           # thinned labels
    assert all(t.get_fontsize() >= 8 for t in fig.axes[0].get_yticklabels())
    plt.close(fig)
    with pytest.raises(InputError):
        va.head_grid(w[0], list("abcde"))


def test_fit_figsize_and_tick_step():
    assert va.fit_figsize(5, 3) == (5, 3)
    assert va.fit_figsize(20, 4) == (10.0, 2.0)
    assert va.tick_step(10) == 1 and va.tick_step(70) == 3 and va.tick_step(64) == 2


def test_qkv_figure_marks_head_boundaries():
    q = torch.randn(4, 12)
    fig = va.qkv_figure(q, q, q, LABELS, head_dim=4)
    assert len(fig.axes) == 3
    assert len(fig.axes[0].lines) == 2            # boundaries at 4 and 8
    plt.close(fig)


def test_head_pattern_scores_find_a_previous_token_head():
    T = 6
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1      # every query looks one back
    uniform = torch.tril(torch.ones(T, T))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    w = torch.stack([torch.stack([uniform, prev])])          # (1 layer, 2 heads, T, T)
    marked = np.zeros(T, bool)
    marked[2] = True
    s = heads.head_pattern_scores(w, marked=marked)
    assert heads.uniform_baseline([marked]) == pytest.approx(np.mean([marked[: i + 1].mean() for i in range(1, T)]))
    assert s["previous token"][0, 1] == pytest.approx(1.0)
    assert heads.best_head(s["previous token"]) == (0, 1)
    assert s["first token"][0, 0] == pytest.approx(np.mean([1 / (i + 1) for i in range(1, T)]))
    assert s["marked tokens"][0, 1] == pytest.approx(1 / (T - 1))   # only query 3 looks at key 2
    fig = heads.head_scores_figure(s)
    assert len(fig.axes) == 4
    plt.close(fig)
    with pytest.raises(InputError):
        heads.head_pattern_scores(w[0])


def test_loss_curve_and_smoothing():
    assert np.allclose(training.smooth([1, 3, 5, 7], window=2), [1, 2, 4, 6])
    rec = {"steps": [0, 1, 2], "train_loss": [3.0, 2.0, 1.0], "val_steps": [2], "val_loss": [1.5]}
    fig = training.record_figure(rec, vocab_size=1024)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["train (smoothed)", "validation"]
    assert np.allclose(ax.lines[0].get_ydata(), [3, 2, 1])
    plt.close(fig)
    fig, ax = plt.subplots()
    with pytest.raises(InputError):
        training.loss_curve(ax, [0, 1], [1.0])
    plt.close(fig)


def test_embedding_and_block_figures():
    t = torch.randn(4, 8)
    fig = embeddings.embedding_figure(t, t, 2 * t, LABELS)
    assert len(fig.axes) == 3
    plt.close(fig)
    sim = embeddings.cosine_similarity(t)
    assert np.allclose(np.diag(sim), 1)
    with pytest.raises(InputError):
        embeddings.embedding_figure(t, t[:2], t, LABELS)
    fig = block.norm_placement_figure()
    texts = " ".join(x.get_text() for x in fig.axes[0].texts)
    assert "ln_1" in texts and "pre-LN" in texts and "post-LN" in texts
    plt.close(fig)
