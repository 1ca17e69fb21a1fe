"""Embedding pictures: token + position embeddings of a prompt, and how similar learned positions are.

Introduced in notebooks/01_tokens_and_embeddings.ipynb.
"""

from __future__ import annotations

import numpy as np
import matplotlib.pyplot as plt

from ..errors import InputError
from .attention import as_array, figure_for, heatmap, update_heatmap


def embedding_figure(tok, pos, total, labels, title: str | None = None, fig=None):
    """Three heatmaps, one row per token: wte[ids], wpe[positions] and their sum (T, D each).

    With ``fig`` they are drawn into that (cleared) figure; the artists are kept in
    ``fig.course_handles`` for :func:`update_embedding_figure`."""
    tok, pos, total = _check_three(tok, pos, total)
    lim = float(max(np.abs(tok).max(), np.abs(pos).max(), np.abs(total).max())) or 1.0
    size = (10, min(8.0, max(2.4, 0.3 * min(len(labels), 32) + 1.2)))
    fig = figure_for(fig, size)
    axes = fig.subplots(1, 3)
    pos_labels = [f"pos {i}" for i in range(len(labels))]
    images = []
    for ax, m, name, rows in zip(axes, (tok, pos, total),
                                 ("token embedding wte[id]", "+ position embedding wpe[t]", "= input of block 0"),
                                 (labels, pos_labels, labels)):
        images.append(heatmap(ax, m, rows, None, title=name, cmap="coolwarm", vmin=-lim, vmax=lim, annotate=False,
                              xlabel=f"dimension (D = {m.shape[1]})"))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.course_handles = {"images": images}
    return fig


def _check_three(tok, pos, total):
    tok, pos, total = as_array(tok), as_array(pos), as_array(total)
    if not tok.shape == pos.shape == total.shape or tok.ndim != 2:
        raise InputError(f"need three (T, D) matrices of one shape, got {tok.shape}, {pos.shape}, {total.shape}")
    return tok, pos, total


def update_embedding_figure(fig, tok, pos, total, labels):
    """New embeddings for a figure that :func:`embedding_figure` drew for as many tokens."""
    tok, pos, total = _check_three(tok, pos, total)
    lim = float(max(np.abs(tok).max(), np.abs(pos).max(), np.abs(total).max())) or 1.0
    im_tok, im_pos, im_sum = fig.course_handles["images"]
    update_heatmap(im_tok, tok, -lim, lim, row_labels=labels)
    update_heatmap(im_pos, pos, -lim, lim)
    update_heatmap(im_sum, total, -lim, lim, row_labels=labels)
    return fig


def cosine_similarity(m) -> np.ndarray:
    """Cosine similarity between the rows of ``m`` (N, D) → (N, N)."""
    m = as_array(m)
    unit = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def position_similarity_figure(wpe, n: int = 64, title: str | None = None):
    """How alike the learned position vectors are: cosine similarity of positions 0..n-1."""
    sim = cosine_similarity(as_array(wpe)[:n])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ticks = list(range(0, len(sim), max(1, len(sim) // 8)))
    heatmap(ax, sim, None, None, title=title or "cosine similarity of position embeddings",
            cmap="RdBu_r", vmin=-1, vmax=1, annotate=False, colorbar=True,
            xlabel="position", ylabel="position")
    ax.set_xticks(ticks, ticks)
    ax.set_yticks(ticks, ticks)
    fig.tight_layout()
    return fig
