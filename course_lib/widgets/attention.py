"""Interactive attention: Q/K/V of a prompt, the five attention steps, and per-head patterns.

The logic is in plain functions (``qkv_views``, ``attention_steps``, ``attention_views``,
``head_views``) that return tensors and labels; the ``*_figure`` functions draw them; the
``*Explorer`` classes wire them to ipywidgets. Tests call all three without a browser.

Introduced in notebooks/02_q_k_v.ipynb (Q/K/V), notebooks/03_scores_mask_softmax.ipynb (steps,
query slider, temperature, mask toggle) and notebooks/04_multi_head_attention.ipynb (heads).
"""

from __future__ import annotations

import math

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch

from ..errors import InputError
from ..model import Trace, causal_mask
from ..viz import attention as va
from .common import Explorer, detach_figure, prompt_ids

DEFAULT_PROMPT = "The for statement is used to iterate over the elements of a list."


# --------------------------------------------------------------------------- plain functions


def _check_index(name: str, value, n: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise InputError(f"{name}={value!r} is out of range: {what} has indices 0..{n - 1}")
    return int(value)


@torch.no_grad()
def trace_prompt(model, tokenizer, prompt: str):
    """Run ``prompt`` through ``model`` with a :class:`Trace`: (ids, labels, trace)."""
    ids = prompt_ids(tokenizer, prompt, model.config.n_positions)
    trace = Trace()
    device = model.transformer.wte.weight.device
    model(torch.tensor([ids], device=device), trace=trace)
    return ids, tokenizer.labels(ids), trace


def qkv_views(model, tokenizer, prompt: str, layer: int = 0) -> dict:
    """Q, K and V of one layer for ``prompt``, heads side by side: each (T, D)."""
    layer = _check_index("layer", layer, model.config.n_layer, "the model")
    ids, labels, trace = trace_prompt(model, tokenizer, prompt)

    def merged(name):  # (1, H, T, Dh) -> (T, H*Dh)
        t = trace[f"h{layer}.attn.{name}"][0]
        return t.transpose(0, 1).reshape(t.shape[1], -1).cpu()

    return {"ids": ids, "labels": labels, "layer": layer, "head_dim": model.config.head_dim,
            "q": merged("q"), "k": merged("k"), "v": merged("v"), "x": trace[f"h{layer}.ln_1"][0].cpu()}


def _qkv_title(views: dict) -> str:
    return f"layer {views['layer']}: one row per token; dashed lines split the heads"


def qkv_figure(views: dict, fig=None):
    """Q, K and V of :func:`qkv_views` as heatmaps (into ``fig`` if given)."""
    return va.qkv_figure(views["q"], views["k"], views["v"], views["labels"], head_dim=views["head_dim"],
                         title=_qkv_title(views), fig=fig)


def update_qkv_figure(fig, views: dict):
    """New Q, K and V (another layer, the same tokens) for a figure of :func:`qkv_figure`."""
    return va.update_qkv_figure(fig, views["q"], views["k"], views["v"], title=_qkv_title(views))


def attention_steps(q, k, temperature: float = 1.0, mask_on: bool = True) -> dict:
    """The attention steps of one head, by hand: q (T, Dh), k (S, Dh) → dict of (T, S) tensors.

    ``scaled = q·kᵀ / (temperature · √Dh)``: temperature 1 is what the model computes; below 1
    sharpens the softmax, above 1 flattens it. With ``mask_on=False`` the causal mask is dropped
    and queries see future keys (what training must never allow).
    """
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InputError(f"temperature must be a positive number, got {temperature!r}")
    q, k = torch.as_tensor(q, dtype=torch.float32), torch.as_tensor(k, dtype=torch.float32)
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise InputError(f"need q (T, Dh) and k (S, Dh) with the same Dh, got {tuple(q.shape)} and {tuple(k.shape)}")
    T, S = q.shape[0], k.shape[0]
    scores = q @ k.T                                                   # (T, S)
    scaled = scores / (temperature * math.sqrt(q.shape[1]))
    mask = causal_mask(T, S) if mask_on else torch.ones(T, S, dtype=torch.bool)
    masked = scaled.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(masked, dim=-1)                            # rows sum to 1
    return {"scores": scores, "scaled": scaled, "mask": mask, "masked": masked, "weights": weights}


def attention_views(model, tokenizer, prompt: str, query_index: int, temperature: float = 1.0,
                    mask_on: bool = True, layer: int = 0, head: int = 0) -> dict:
    """Everything the notebook 03 widget shows for one setting of its controls.

    Returns labels, the five steps of ``head`` in ``layer`` (each (T, T)), the query's row of
    weights, and ``future_weight``: how much of that row lands on later tokens (0 with the mask).
    """
    layer = _check_index("layer", layer, model.config.n_layer, "the model")
    head = _check_index("head", head, model.config.n_head, "each layer")
    ids, labels, trace = trace_prompt(model, tokenizer, prompt)
    query_index = _check_index("query_index", query_index, len(ids), f"the prompt of {len(ids)} tokens")
    q = trace[f"h{layer}.attn.q"][0, head].cpu()                       # (T, Dh)
    k = trace[f"h{layer}.attn.k"][0, head].cpu()                       # (T, Dh)
    steps = attention_steps(q, k, temperature, mask_on)
    row = steps["weights"][query_index]
    return {"ids": ids, "labels": labels, "layer": layer, "head": head, "query_index": query_index,
            "temperature": float(temperature), "mask_on": bool(mask_on), "steps": steps, "row": row,
            "future_weight": float(row[query_index + 1:].sum()),
            "model_weights": trace[f"h{layer}.attn.weights"][0, head].cpu()}


def attention_summary(views: dict) -> str:
    """The query's row of weights as one line of text per key (what the widget prints)."""
    labels, row, qi = views["labels"], views["row"], views["query_index"]
    head = (f"layer {views['layer']} · head {views['head']} · query {qi} {labels[qi]!r} · "
            f"temperature {views['temperature']:.2f} · mask {'on' if views['mask_on'] else 'OFF'}")
    cells = "  ".join(f"{lab}:{w:.3f}" for lab, w in zip(labels, row.tolist()))
    return (f"{head}\nweights  {cells}\n"
            f"weight on future tokens: {views['future_weight']:.3f}")


def _attention_title(views: dict) -> str:
    t = views["temperature"]
    return (f"layer {views['layer']}, head {views['head']} · scale 1/({t:g}·√d_k) · "
            f"mask {'on' if views['mask_on'] else 'OFF: future tokens leak in'}")


def attention_figure(views: dict, fig=None):
    """The five steps for one setting of notebook 03's controls (into ``fig`` if given)."""
    return va.steps_figure(views["steps"], views["labels"], views["query_index"], suptitle=_attention_title(views),
                           fig=fig)


def update_attention_figure(fig, views: dict):
    """New values for a figure of :func:`attention_figure` drawn for the same tokens."""
    return va.update_steps_figure(fig, views["steps"], views["labels"], views["query_index"],
                                  suptitle=_attention_title(views))


def head_views(model, tokenizer, prompt: str, layer: int = 0, head: int = 0) -> dict:
    """All heads of one layer for ``prompt``: weights (H, T, T), head outputs (H, T, Dh), the
    merged heads (T, D) before W_o and the attention output (T, D) after it."""
    layer = _check_index("layer", layer, model.config.n_layer, "the model")
    head = _check_index("head", head, model.config.n_head, "each layer")
    ids, labels, trace = trace_prompt(model, tokenizer, prompt)
    name = f"h{layer}.attn."
    return {"ids": ids, "labels": labels, "layer": layer, "head": head, "head_dim": model.config.head_dim,
            "weights": trace[name + "weights"][0].cpu(), "head_out": trace[name + "head_out"][0].cpu(),
            "merged": trace[name + "merged"][0].cpu(), "out": trace[name + "out"][0].cpu()}


def head_figure(views: dict, fig=None):
    """Top: every head's weights (the chosen one outlined). Bottom: merged heads and W_o output.

    With ``fig`` it is drawn into that (cleared) figure; the artists are kept in
    ``fig.course_handles`` for :func:`update_head_figure`."""
    w, labels, H = views["weights"], views["labels"], views["weights"].shape[0]
    T = len(labels)
    size = min(max(2.4, 0.22 * T + 1.0), 10.0 / H)               # at most 10 inches wide
    fig = va.figure_for(fig, (size * H, 2 * size + 0.8))
    gs = fig.add_gridspec(2, H, hspace=0.45)
    handles = {"heads": [], "merged": [], "box": None}
    for h in range(H):
        ax = fig.add_subplot(gs[0, h])
        handles["heads"].append(va.heatmap(ax, w[h], labels, labels, title=f"head {h}", cmap="Blues", vmin=0,
                                           vmax=1, annotate=False))
        if h:
            ax.set_yticklabels([])
    half = max(1, H // 2)
    for col, (name, m) in enumerate((("merged heads (before W_o)", views["merged"]),
                                     ("attention output = merged @ W_o + b_o", views["out"]))):
        ax = fig.add_subplot(gs[1, col * half:(col + 1) * half] if H > 1 else gs[1, 0])
        lim = float(m.abs().max()) or 1.0
        handles["merged"].append(va.heatmap(ax, m, labels, None, title=name, cmap="coolwarm", vmin=-lim, vmax=lim,
                                            annotate=False, xlabel="dimension"))
        if col == 0:
            dh = views["head_dim"]
            for b in range(dh, m.shape[1], dh):
                ax.axvline(b - 0.5, color="black", linestyle="--", linewidth=0.8)
            handles["box"] = plt.Rectangle((-0.5, -0.5), dh, T, fill=False, edgecolor="red", linewidth=2)
            ax.add_patch(handles["box"])
        else:
            ax.set_yticklabels([])
    handles["suptitle"] = fig.suptitle("", fontsize=10)
    fig.course_handles = handles
    _mark_head(fig, views)
    return fig


def _mark_head(fig, views: dict) -> None:
    """Outline the chosen head (its heatmap's frame, its columns of the merged heads) and title."""
    h = fig.course_handles
    for i, im in enumerate(h["heads"]):
        for spine in im.axes.spines.values():
            spine.set_edgecolor("red" if i == views["head"] else "black")
            spine.set_linewidth(2.5 if i == views["head"] else 0.8)
    h["box"].set_x(views["head"] * views["head_dim"] - 0.5)
    h["suptitle"].set_text(f"layer {views['layer']}: attention weights per head, then the heads merged")


def update_head_figure(fig, views: dict):
    """New layer or head (the same tokens) for a figure that :func:`head_figure` drew."""
    h = fig.course_handles
    for im, w in zip(h["heads"], views["weights"]):
        va.update_heatmap(im, w, 0, 1)
    for im, m in zip(h["merged"], (views["merged"], views["out"])):
        lim = float(m.abs().max()) or 1.0
        va.update_heatmap(im, m, -lim, lim)
    _mark_head(fig, views)
    return fig


def head_summary(views: dict) -> str:
    w = views["weights"][views["head"]]
    T = w.shape[0]
    prev = float(torch.diagonal(w, -1).mean()) if T > 1 else float("nan")
    self_w = float(torch.diagonal(w).mean())
    first = float(w[:, 0].mean())
    newline = torch.tensor(["↵" in lab for lab in views["labels"]])
    on_newlines = float((w * newline).sum(-1).mean())
    return (f"layer {views['layer']} · head {views['head']} · {T} tokens\n"
            f"mean weight on the previous token {prev:.3f} · on itself {self_w:.3f} · on the first token {first:.3f}"
            f" · on newline tokens {on_newlines:.3f}")


# --------------------------------------------------------------------------- the widgets


def _prompt_box(prompt: str, multiline: bool = False):
    """A prompt box that reports its value when you press Enter (or, multi-line, when you click away)."""
    if multiline:
        return widgets.Textarea(value=prompt, description="prompt", continuous_update=False, rows=4,
                                layout=widgets.Layout(width="95%"))
    return widgets.Text(value=prompt, description="prompt", continuous_update=False,
                        layout=widgets.Layout(width="95%"))


def _slider(description: str, value: int, maximum: int) -> widgets.IntSlider:
    # a set width: in a row of controls (an HBox) a slider without one shrinks to nothing
    return widgets.IntSlider(value=value, min=0, max=maximum, description=description,
                             continuous_update=False, style={"description_width": "initial"},
                             layout=widgets.Layout(width="320px", min_width="300px"))


def _row(*children) -> widgets.HBox:
    """Controls side by side that wrap onto the next line in a narrow window (never squeezed)."""
    return widgets.HBox(list(children), layout=widgets.Layout(flex_flow="row wrap"))


class QKVExplorer(Explorer):
    """Notebook 02: type a prompt, pick a layer, see its Q, K and V as heatmaps."""

    def __init__(self, model, tokenizer, prompt: str = DEFAULT_PROMPT, layer: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = _prompt_box(prompt)
        self.layer = _slider("layer", layer, model.config.n_layer - 1)
        super().__init__([self.prompt, self.layer])
        self.update()

    def compute(self):
        views = qkv_views(self.model, self.tokenizer, self.prompt.value, self.layer.value)
        text = (f"{len(views['ids'])} tokens: {' | '.join(views['labels'])}\n"
                f"Q, K, V each {tuple(views['q'].shape)} = (tokens, n_embd)")
        self.views = views
        return text, self.render(views, tuple(views["ids"]))

    def draw(self, views) -> None:
        self.fig = detach_figure(qkv_figure(views, fig=self.fig))

    def refresh(self, views) -> None:
        update_qkv_figure(self.fig, views)


class AttentionExplorer(Explorer):
    """Notebook 03: the five steps for the learner's prompt, with sliders for the query token,
    the temperature of the scale and a causal-mask toggle."""

    def __init__(self, model, tokenizer, prompt: str = DEFAULT_PROMPT, layer: int = 0, head: int = 0,
                 query_index: int = 3):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = _prompt_box(prompt)
        self.query = _slider("query token", query_index, max(query_index, 1))
        self.temperature = widgets.FloatSlider(value=1.0, min=0.1, max=5.0, step=0.05, description="temperature",
                                               continuous_update=False, style={"description_width": "initial"},
                                               layout=widgets.Layout(width="320px", min_width="300px"))
        self.mask = widgets.Checkbox(value=True, description="causal mask on", indent=False,
                                     layout=widgets.Layout(width="auto"))
        self.layer = _slider("layer", layer, model.config.n_layer - 1)
        self.head = _slider("head", head, model.config.n_head - 1)
        self._busy = False
        self._query_row = _row(self.query, self.temperature, self.mask)
        controls = [self.prompt, self._query_row, _row(self.layer, self.head)]
        super().__init__(controls, watch=[self.prompt, self.query, self.temperature, self.mask,
                                          self.layer, self.head])
        self._fit_query_slider()
        self.update()

    def _on_change(self, change) -> None:
        if self._busy:
            return
        if change["owner"] is self.prompt:
            self._fit_query_slider()
        self.update()

    def _fit_query_slider(self) -> None:
        """Let the query slider span the prompt's tokens (left alone if the prompt is bad).

        A new slider replaces the old one when the number of tokens changes: the browser's
        slider keeps its first range for the Home/End keys even after ``max`` changes."""
        try:
            n = len(prompt_ids(self.tokenizer, self.prompt.value, self.model.config.n_positions))
        except Exception:  # noqa: BLE001 - update() shows the message
            return
        new_max = max(n - 1, 0)
        if new_max == self.query.max:
            return
        old = self.query
        old.unobserve(self._on_change, names="value")
        self.query = _slider("query token", min(old.value, new_max), new_max)
        self.query.observe(self._on_change, names="value")
        self._query_row.children = (self.query, *self._query_row.children[1:])
        old.close()

    def compute(self):
        views = attention_views(self.model, self.tokenizer, self.prompt.value, self.query.value,
                                self.temperature.value, self.mask.value, self.layer.value, self.head.value)
        self.views = views
        still = (tuple(views["ids"]), self.temperature.value, self.mask.value, self.layer.value, self.head.value)
        return attention_summary(views), self.render(views, tuple(views["ids"]), background_key=still)

    def draw(self, views) -> None:
        self.fig = detach_figure(attention_figure(views, fig=self.fig))

    def moving_artists(self) -> list:
        """What the query slider changes: the outlined rows, the bar chart, the title."""
        h = self.fig.course_handles
        return [*h["rows"], *([h["bar"]["title"].axes] if h["bar"] else []), *([h["suptitle"]] if h["suptitle"] else [])]

    def refresh(self, views) -> None:
        update_attention_figure(self.fig, views)


class HeadExplorer(Explorer):
    """Notebook 04: layer and head sliders over the trained model's per-head attention weights.
    The prompt box takes several lines (edit, then click outside the box)."""

    def __init__(self, model, tokenizer, prompt: str = DEFAULT_PROMPT, layer: int = 0, head: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = _prompt_box(prompt, multiline=True)
        self.layer = _slider("layer", layer, model.config.n_layer - 1)
        self.head = _slider("head", head, model.config.n_head - 1)
        super().__init__([self.prompt, _row(self.layer, self.head)],
                         watch=[self.prompt, self.layer, self.head])
        self.update()

    def compute(self):
        views = head_views(self.model, self.tokenizer, self.prompt.value, self.layer.value, self.head.value)
        self.views = views
        return head_summary(views), self.render(views, tuple(views["ids"]))

    def draw(self, views) -> None:
        self.fig = detach_figure(head_figure(views, fig=self.fig))

    def refresh(self, views) -> None:
        update_head_figure(self.fig, views)
