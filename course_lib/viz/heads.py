"""Measuring what each head does: how much weight goes to the previous token, to the token itself,
to the first token, or to chosen tokens (e.g. newlines). The scores decide which heads the
notebooks show. Introduced in notebooks/04_multi_head_attention.ipynb.
"""

from __future__ import annotations

import numpy as np
import matplotlib.pyplot as plt
import torch

from ..errors import InputError
from .attention import as_array, heatmap



def layer_weights(trace, n_layer: int) -> torch.Tensor:
    """Attention weights of every layer of a traced single sequence: (L, H, T, S)."""
    return torch.stack([trace[f"h{i}.attn.weights"][0] for i in range(n_layer)]).cpu()


def head_pattern_scores(weights, marked=None, skip: int = 1, marked_name: str = "marked tokens") -> dict[str, np.ndarray]:
    """Mean weight per (layer, head) that a query puts on each pattern's keys.

    ``weights`` is (L, H, T, T) for one sequence; queries before ``skip`` are left out (query 0
    can only see itself). ``marked`` is a boolean (T,) of keys to count as "marked tokens"
    (e.g. newlines or punctuation); a query counts only marked keys it can see.
    Returns name → (L, H) array.
    """
    w = as_array(weights)
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise InputError(f"need weights of shape (L, H, T, T), got {w.shape}")
    T = w.shape[-1]
    if T <= skip:
        raise InputError(f"need more than {skip} tokens to score heads, got {T}")
    rows = np.arange(skip, T)
    out = {"previous token": w[..., rows, rows - 1].mean(-1),
           "self": w[..., rows, rows].mean(-1),
           "first token": w[..., rows, 0].mean(-1)}
    if marked is not None:
        marked = np.asarray(marked, dtype=bool)
        if marked.shape != (T,):
            raise InputError(f"marked must be a boolean vector of length {T}, got shape {marked.shape}")
        out[marked_name] = (w[..., rows, :] * marked[None, None, None, :]).sum(-1).mean(-1)
    return out


def best_head(scores: np.ndarray) -> tuple[int, int]:
    """(layer, head) with the highest score."""
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(layer), int(head)


def head_scores_figure(scores: dict[str, np.ndarray], title: str | None = None):
    """One small L × H table per pattern, the numbers written in."""
    names = list(scores)
    top = max(0.2, max(float(np.max(v)) for v in scores.values()))   # one colour scale for all panels
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        s = scores[name]
        heatmap(ax, s, [f"L{i}" for i in range(s.shape[0])], [f"H{j}" for j in range(s.shape[1])],
                title=name, cmap="Greens", vmin=0, vmax=top, annotate=True)
        ax.tick_params(axis="x", rotation=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def newline_ids(tokenizer) -> set[int]:
    """Ids of the tokens that contain a newline (the line breaks of the text)."""
    return {i for i, t in enumerate(tokenizer.id_to_token) if "\n" in t}


def uniform_baseline(marked_windows: list, skip: int = 1) -> float:
    """The "marked" score of a head that spread its weight evenly over the keys it can see."""
    vals = []
    for marked in marked_windows:
        m = np.asarray(marked, dtype=float)
        vals.append(np.mean([m[: i + 1].mean() for i in range(skip, len(m))]))
    return float(np.mean(vals))


@torch.no_grad()
def measure_heads(model, ids: list[int], window: int = 64, stride: int = 97, max_windows: int = 24,
                  marked_ids: set[int] | None = None, marked_name: str = "marked tokens"
                  ) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Average :func:`head_pattern_scores` over windows of ``ids`` (e.g. held-out text).

    Returns (name → (L, H) mean scores, the windows used).
    """
    from ..model import Trace

    if window > model.config.n_positions:
        raise InputError(f"window {window} is longer than the model's context {model.config.n_positions}")
    windows = [ids[s:s + window] for s in range(0, len(ids) - window, stride)][:max_windows]
    if not windows:
        raise InputError(f"need more than {window} token ids to measure heads, got {len(ids)}")
    device = model.transformer.wte.weight.device
    totals = None
    for w in windows:
        trace = Trace()
        model(torch.tensor([w], device=device), trace=trace)
        marked = None if marked_ids is None else np.array([t in marked_ids for t in w])
        s = head_pattern_scores(layer_weights(trace, model.config.n_layer), marked=marked, marked_name=marked_name)
        totals = s if totals is None else {k: totals[k] + s[k] for k in s}
    return {k: v / len(windows) for k, v in totals.items()}, windows
