"""Notebook 05's widget: inside one transformer block, how large is each part, per token?

For every token it shows the length (L2 norm) of the block's input, of what attention adds,
of what the MLP adds, and of the block's output: the residual stream and its two updates.
Introduced in notebooks/05_transformer_block.ipynb.
"""

from __future__ import annotations

import numpy as np

from ..viz.attention import figure_for
from .attention import _check_index, _prompt_box, _slider, trace_prompt
from .common import Explorer, detach_figure

PARTS = ("input x", "attention adds", "MLP adds", "output")


def block_views(model, tokenizer, prompt: str, layer: int = 0) -> dict:
    """Per-token norms (T,) of the block's input, attention output, MLP output and block output."""
    layer = _check_index("layer", layer, model.config.n_layer, "the model")
    ids, labels, trace = trace_prompt(model, tokenizer, prompt)
    x_in = trace["embed.sum"] if layer == 0 else trace[f"h{layer - 1}.resid_out"]
    parts = {"input x": x_in, "attention adds": trace[f"h{layer}.attn.out"],
             "MLP adds": trace[f"h{layer}.mlp.out"], "output": trace[f"h{layer}.resid_out"]}
    norms = {k: v[0].norm(dim=-1).cpu().numpy() for k, v in parts.items()}
    return {"ids": ids, "labels": labels, "layer": layer, "norms": norms}


def _block_title(views: dict) -> str:
    return f"block {views['layer']}: the residual stream and what attention and the MLP add to it"


def block_figure(views: dict, fig=None):
    """Four bars per token (the norms of :func:`block_views`); into ``fig`` if given. The bars
    are kept in ``fig.course_handles`` for :func:`update_block_figure`."""
    labels, norms = views["labels"], views["norms"]
    T = len(labels)
    size = (min(10, 1.2 + 0.55 * T), 3.4)
    fig = figure_for(fig, size)
    ax = fig.subplots()
    width = 0.2
    bars = {part: ax.bar(np.arange(T) + (i - 1.5) * width, norms[part], width, label=part)
            for i, part in enumerate(PARTS)}
    ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
    ax.set_ylabel("length ‖·‖")
    title = ax.set_title(_block_title(views), fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    _block_ylim(ax, norms)
    fig.tight_layout()
    fig.course_handles = {"bars": bars, "title": title}
    return fig


def _block_ylim(ax, norms: dict) -> None:
    ax.set_ylim(0, 1.3 * max(float(v.max()) for v in norms.values()))   # room for the legend


def update_block_figure(fig, views: dict):
    """New bar heights (another layer, the same tokens) for a figure of :func:`block_figure`."""
    h = fig.course_handles
    for part, container in h["bars"].items():
        for bar, v in zip(container, views["norms"][part]):
            bar.set_height(float(v))
    _block_ylim(fig.axes[0], views["norms"])
    h["title"].set_text(_block_title(views))
    return fig


class BlockExplorer(Explorer):
    """A prompt box and a layer slider; bars of the four norms per token."""

    def __init__(self, model, tokenizer, prompt: str = "The for statement is used to iterate.", layer: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = _prompt_box(prompt)
        self.layer = _slider("layer", layer, model.config.n_layer - 1)
        super().__init__([self.prompt, self.layer])
        self.update()

    def compute(self):
        views = block_views(self.model, self.tokenizer, self.prompt.value, self.layer.value)
        self.views = views
        n = views["norms"]
        text = (f"block {views['layer']}, {len(views['ids'])} tokens: mean length of input {n['input x'].mean():.2f}, "
                f"attention adds {n['attention adds'].mean():.2f}, MLP adds {n['MLP adds'].mean():.2f}, "
                f"output {n['output'].mean():.2f}")
        return text, self.render(views, tuple(views["ids"]))

    def draw(self, views) -> None:
        self.fig = detach_figure(block_figure(views, fig=self.fig))

    def refresh(self, views) -> None:
        update_block_figure(self.fig, views)
