"""Diagrams of the transformer block: where LayerNorm sits (pre-LN, as in GPT-2, against the
post-LN of the original Transformer), and the whole tiny GPT as a stack of blocks.

Drawn with matplotlib boxes and arrows from the same lists of steps the text describes.
Introduced in notebooks/05_transformer_block.ipynb; the stack in notebooks/06_tiny_gpt.ipynb.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

from ..errors import InputError

COLORS = {"norm": "#fde9a9", "attn": "#c6dbef", "mlp": "#c7e9c0", "add": "#ffffff", "io": "#eeeeee",
          "head": "#f2d0e0"}

# (label, kind) from bottom to top. "add" closes the residual opened at the last "branch".
PRE_LN = [("x (B, T, D)", "io"), ("LayerNorm ln_1", "norm"), ("causal self-attention", "attn"), ("+", "add"),
          ("LayerNorm ln_2", "norm"), ("MLP: Linear → GELU → Linear", "mlp"), ("+", "add"), ("out (B, T, D)", "io")]
POST_LN = [("x (B, T, D)", "io"), ("causal self-attention", "attn"), ("+", "add"), ("LayerNorm", "norm"),
           ("MLP: Linear → GELU → Linear", "mlp"), ("+", "add"), ("LayerNorm", "norm"), ("out (B, T, D)", "io")]


def _box(ax, x, y, text, kind, width=2.6, height=0.55):
    if kind == "add":
        ax.add_patch(plt.Circle((x, y), 0.22, facecolor="white", edgecolor="black"))
        ax.text(x, y, "+", ha="center", va="center", fontsize=12)
        return
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.05",
                                facecolor=COLORS[kind], edgecolor="black"))
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def _arrow(ax, x0, y0, x1, y1, **kw):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2, **kw))


def draw_block(ax, steps, title: str, x: float = 0.0, post_ln: bool = False) -> None:
    """Draw one block from bottom to top; a residual arrow skips from each branch point to its "+".

    In a post-LN block the LayerNorm sits on the main path, so the next branch starts after it."""
    if not steps or steps[0][1] != "io":
        raise InputError("a block's steps must start with its input")
    ys = [i * 1.0 for i in range(len(steps))]
    for (label, kind), y in zip(steps, ys):
        _box(ax, x, y, label, kind)
    for y0, y1, (_, kind) in zip(ys, ys[1:], steps[1:]):
        _arrow(ax, x, y0 + (0.22 if steps[ys.index(y0)][1] == "add" else 0.3), x, y1 - (0.22 if kind == "add" else 0.3))
    # residual: from the value entering a branch to the "+" that closes it
    branch_start = 0
    for i, (_, kind) in enumerate(steps):
        if kind == "add":
            y0, y1 = ys[branch_start] + 0.45, ys[i]
            side = x + 1.75
            ax.plot([x, side, side], [y0, y0, y1], color="#d62728", lw=1.2)
            _arrow(ax, side, y1, x + 0.22, y1, color="#d62728")
            branch_start = i
        elif kind == "norm" and post_ln:
            branch_start = i
    ax.text(x, ys[-1] + 0.8, title, ha="center", fontsize=10, weight="bold")


def norm_placement_figure():
    """GPT-2's pre-LN block beside the post-LN block of the original Transformer."""
    fig, ax = plt.subplots(figsize=(9, 6.2))
    draw_block(ax, PRE_LN, "pre-LN (GPT-2, this course)", x=0.0)
    draw_block(ax, POST_LN, "post-LN (original Transformer)", x=4.8, post_ln=True)
    ax.text(0, -0.9, "x + attn(ln_1(x)), then x + mlp(ln_2(x))\nthe residual path is never normalised",
            ha="center", fontsize=8)
    ax.text(4.8, -0.9, "ln(x + attn(x)), then ln(x + mlp(x))\nevery sum goes through a LayerNorm",
            ha="center", fontsize=8)
    ax.set_xlim(-2, 7)
    ax.set_ylim(-1.5, len(PRE_LN) + 0.3)
    ax.axis("off")
    fig.tight_layout()
    return fig


def gpt_stack_figure(n_layer: int, n_head: int, n_embd: int, vocab_size: int, n_positions: int):
    """The whole model: embeddings, ``n_layer`` blocks, final LayerNorm, tied LM head."""
    steps = [("token ids (B, T)", "io"), (f"wte[ids] + wpe[pos]   → (B, T, {n_embd})", "io")]
    steps += [(f"block {i}: {n_head} heads, pre-LN", "attn") for i in range(n_layer)]
    steps += [("final LayerNorm ln_f", "norm"), (f"LM head = wteᵀ (tied) → (B, T, {vocab_size})", "head"),
              ("softmax of the last row → next token", "io")]
    fig, ax = plt.subplots(figsize=(5.5, 0.62 * len(steps) + 0.8))
    for i, (label, kind) in enumerate(steps):
        _box(ax, 0, i, label, kind, width=4.2)
        if i:
            _arrow(ax, 0, i - 0.7, 0, i - 0.3)
    ax.text(0, len(steps) - 0.2, f"tiny GPT: context {n_positions}, vocabulary {vocab_size}",
            ha="center", fontsize=10, weight="bold")
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(-0.7, len(steps) + 0.2)
    ax.axis("off")
    fig.tight_layout()
    return fig
