"""Checks of the exercises in notebooks/06_tiny_gpt.ipynb."""

from __future__ import annotations

import torch

from ..model import GPT, Trace
from .common import correct, require, require_close, require_number, unanswered


def check_logits(lg, model, ids: torch.Tensor) -> None:
    """Exercise 1: the logits from the final hidden states and the tied embedding."""
    if unanswered(lg):
        return
    trace = Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    require_close(lg, trace["logits"], "the logits differ: multiply ln_f's output by the transposed "
                  "token embedding wte (the head is tied to it)", shape_hint="it should be (B, T, V)",
                  atol=1e-4, rtol=1e-4)
    correct()


def check_total(fn, configs) -> None:
    """Exercise 2: ``fn(config)``, the parameter count of a GPT-2 model."""
    if unanswered(fn(configs[0])):
        return
    for c in configs:
        want = GPT(c).num_params(non_embedding=False)
        got = fn(c)
        require(got != want - 2 * c.n_embd, f"{c.n_layer} layers, D={c.n_embd}: the final LayerNorm is missing")
        require(got == want, f"{c.n_layer} layers, D={c.n_embd}: wrong count; embeddings, the blocks, ln_f")
    correct()


def check_sharp(t, model, tokenizer, prompt: str = "A list is") -> None:
    """Exercise 3: a temperature at which the favourite next token has probability > 0.9."""
    if unanswered(t):
        return
    require_number(t, "the temperature")
    require(t > 0, "use a positive temperature (0 means greedy, which has no probabilities)")
    from ..widgets.sampling import next_token_table

    p = next_token_table(model, tokenizer, prompt, temperature=t, k=1)[0]
    require(p[1] > 0.9, f"at temperature {t} the favourite has only {p[1]:.3f}: lower temperatures sharpen")
    correct()
