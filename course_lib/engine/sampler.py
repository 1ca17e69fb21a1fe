"""The sampler: one next token per sequence that reached its last known token this step.

Greedy rows are one batched ``argmax``. Rows with ``temperature > 0`` go through the course's
own rules in :mod:`course_lib.sampling` (temperature, top-k, top-p), each with the request's
own random generator when it has a ``seed``: a seeded request draws the same tokens whatever
else shares its batch. The sampler changes nothing but those generators; the engine records
the tokens (and log-probabilities) once the whole step has succeeded.
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import torch

from ..sampling import filter_logits
from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """``logits`` (R, V), one row per sequence in ``seqs`` → R token ids, and per row the top
    log-probabilities asked for (``SamplingParams.logprobs``; ``None`` where none were)."""
    tokens = logits.argmax(dim=-1)                                  # (R,) greedy for every row
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        # subtracting the row's maximum first changes no probability, and a tiny temperature can
        # then not overflow: every scaled logit is <= 0
        row_logits = logits[row:row + 1].float()
        scaled = (row_logits - row_logits.max()) / p.temperature    # (1, V)
        probs = torch.softmax(filter_logits(scaled, p.top_k or None, p.top_p), dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
    tokens = tokens.tolist()
    logprobs = []
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
        if not k:
            logprobs.append(None)
            continue
        logp = torch.log_softmax(logits[row].float(), dim=-1)      # (V,)
        top = torch.topk(logp, min(k, logp.shape[0]))
        entry = dict(zip(top.indices.tolist(), top.values.tolist()))
        entry[tokens[row]] = logp[tokens[row]].item()               # the chosen token, always
        logprobs.append(entry)
    return tokens, logprobs
