"""Decode step by step and look into the KV cache: the logic behind notebook 08's widget.

:func:`record_decode` runs prefill and greedy decode steps once and keeps what the widget
shows: the cache, its allocated bytes after every step, and each step's attention row of the
new query against the cached keys. :func:`cache_view` picks one step, layer and head out of
that record as plain arrays; :func:`build_cache_widget` wires sliders to it and to
:func:`course_lib.viz.cache.draw_cache_view`. Tests call the first two without a browser.
Introduced in notebooks/08_decode_and_kv_cache.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..model import KVCache, Trace, kv_cache_bytes


@dataclass
class DecodeRecord:
    config: object
    prompt_len: int
    ids: list                     # prompt ids then the generated ids
    labels: list                  # one short label per id
    cache: KVCache                # the cache after the last step
    attn_rows: list = field(default_factory=list)   # per step: (L, H, S) attention of the newest query
    nbytes: list = field(default_factory=list)      # per step: KVCache.nbytes() right after it
    seq_lens: list = field(default_factory=list)    # per step: positions in the cache

    @property
    def n_steps(self) -> int:
        """Steps recorded: step 0 is prefill, steps 1.. are decode steps."""
        return len(self.attn_rows)


def _last_rows(trace: Trace, n_layer: int) -> torch.Tensor:
    rows = [trace[f"h{i}.attn.weights"][0, :, -1, :] for i in range(n_layer)]  # each (H, S)
    return torch.stack(rows).float().cpu()                                      # (L, H, S)


@torch.no_grad()
def record_decode(model, prompt_ids, n_new: int, tokenizer=None) -> DecodeRecord:
    """Prefill ``prompt_ids`` (one sequence), then ``n_new - 1`` greedy decode steps.

    Step 0 is the prefill (its query is the last prompt token); step ``s`` feeds the token
    chosen at step ``s - 1``. After step ``s`` the cache holds ``prompt_len + s`` positions.
    """
    ids = model.check_token_ids(prompt_ids)
    if ids.shape[0] != 1:
        raise InputError(f"record_decode follows one sequence; got a batch of {ids.shape[0]}")
    if not isinstance(n_new, int) or n_new < 1:
        raise InputError(f"n_new must be a positive integer, got {n_new!r}")
    T = ids.shape[1]
    if T + n_new - 1 > model.config.n_positions:
        raise InputError(f"prompt of {T} + {n_new - 1} decode steps exceeds n_positions="
                         f"{model.config.n_positions}; use fewer steps")
    L = model.config.n_layer
    trace = Trace()
    logits, cache = model.prefill(ids, trace=trace)
    all_ids = ids[0].tolist()
    rec = DecodeRecord(model.config, T, all_ids, [], cache)
    rec.attn_rows.append(_last_rows(trace, L))
    rec.nbytes.append(cache.nbytes())
    rec.seq_lens.append(cache.seq_len)
    for _ in range(n_new - 1):
        nxt = logits.argmax(-1)                                   # (1,)
        all_ids.append(int(nxt))
        trace = Trace()
        logits = model.decode_step(nxt, cache, trace=trace)
        rec.attn_rows.append(_last_rows(trace, L))
        rec.nbytes.append(cache.nbytes())
        rec.seq_lens.append(cache.seq_len)
    all_ids.append(int(logits.argmax(-1)))                        # the last step's choice (not cached)
    rec.ids = all_ids
    rec.labels = tokenizer.labels(all_ids) if tokenizer is not None else [str(i) for i in all_ids]
    return rec


def cache_view(record: DecodeRecord, step: int, layer: int = 0, head: int = 0, which: str = "k") -> dict:
    """What the widget shows at ``step`` for one ``layer`` and ``head``, as plain arrays.

    ``rows``: the cached K (or V) rows (S, Dh); ``attn``: the newest query's weights over those
    S keys; ``bytes_formula`` (from :func:`kv_cache_bytes`) and ``bytes_allocated`` (from
    :meth:`KVCache.nbytes` right after that step) for the whole cache, every layer and head.
    """
    cfg = record.config
    if not 0 <= step < record.n_steps:
        raise InputError(f"step must be in 0..{record.n_steps - 1}, got {step}")
    if not 0 <= layer < cfg.n_layer:
        raise InputError(f"layer must be in 0..{cfg.n_layer - 1}, got {layer}")
    if not 0 <= head < cfg.n_head:
        raise InputError(f"head must be in 0..{cfg.n_head - 1}, got {head}")
    if which not in ("k", "v"):
        raise InputError(f"which must be 'k' or 'v', got {which!r}")
    S = record.seq_lens[step]
    store = record.cache.keys if which == "k" else record.cache.values
    rows = store[layer][0, head, :S].float().cpu().numpy()          # (S, Dh)
    elem = record.cache.keys[0].element_size()
    return {
        "step": step, "layer": layer, "head": head, "which": which, "seq_len": S,
        "max_len": record.seq_lens[-1], "prompt_len": record.prompt_len,
        "rows": rows, "attn": record.attn_rows[step][layer, head, :S].numpy(),
        "labels": record.labels[:S], "query": record.labels[S - 1],
        "next_token": record.labels[S], "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "bytes_formula": kv_cache_bytes(cfg, 1, S, elem), "bytes_allocated": record.nbytes[step],
    }


def cache_summary(view: dict) -> str:
    """One line for the widget: the step, the positions cached, and formula vs allocated bytes."""
    kind = "prefill" if view["step"] == 0 else "decode"
    same = "=" if view["bytes_formula"] == view["bytes_allocated"] else "≠"
    return (f"step {view['step']} ({kind}): {view['seq_len']} positions cached in each of "
            f"{view['n_layer']} layers × {view['n_head']} heads; formula {view['bytes_formula']:,} B "
            f"{same} allocated {view['bytes_allocated']:,} B")


def build_cache_widget(record: DecodeRecord):
    """Sliders for step, layer and head, a K/V toggle; the cache view is drawn once and updated.

    Returns a VBox of ``[HBox(step, layer), HBox(head, which), info, image]``; the figure is
    ``box.fig`` and the callback ``box.redraw()`` (what a slider move runs)."""
    import ipywidgets as W

    from ..viz.cache import draw_cache_view, update_cache_view
    from .common import canvas_png, detach_figure, tight_bbox

    cfg = record.config
    wide = W.Layout(width="320px", min_width="300px")
    step = W.IntSlider(value=0, min=0, max=record.n_steps - 1, description="step", layout=wide)
    layer = W.IntSlider(value=0, min=0, max=cfg.n_layer - 1, description="layer", layout=wide)
    head = W.IntSlider(value=0, min=0, max=cfg.n_head - 1, description="head", layout=wide)
    which = W.ToggleButtons(options=[("K", "k"), ("V", "v")], value="k", description="cache")
    info = W.HTML()
    image = W.Image(format="png", layout=W.Layout(max_width="100%"))
    view = cache_view(record, 0)
    fig = detach_figure(draw_cache_view(view))
    bbox = tight_bbox(fig)
    wrap = W.Layout(flex_flow="row wrap")                # narrow window: wrap, never squeeze
    box = W.VBox([W.HBox([step, layer], layout=wrap), W.HBox([head, which], layout=wrap), info, image])

    def redraw(*_):
        view = cache_view(record, step.value, layer.value, head.value, which.value)
        info.value = cache_summary(view)
        update_cache_view(fig, view)
        image.value = canvas_png(fig, 80, bbox)

    for w in (step, layer, head, which):
        w.observe(redraw, names="value")
    redraw()
    box.fig, box.redraw = fig, redraw
    return box
