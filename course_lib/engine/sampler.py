"""The sampler: one next token per sequence that reached its last known token this step.

Greedy rows are one batched ``argmax``. Rows with ``temperature > 0`` go through the course's
own rules in :mod:`course_lib.sampling` (temperature, top-k, top-p), each with the request's
own random generator when it has a ``seed``: a seeded request draws the same tokens whatever
else shares its batch. Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import torch

from ..sampling import filter_logits
from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """``logits`` (R, V), one row per sequence in ``seqs`` → R token ids."""
    tokens = logits.argmax(dim=-1)                                  # (R,) greedy for every row
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        scaled = logits[row:row + 1].float() / p.temperature        # (1, V)
        probs = torch.softmax(filter_logits(scaled, p.top_k or None, p.top_p), dim=-1)
        if seq.generator is None and p.seed is not None:
            seq.generator = torch.Generator(device=logits.device).manual_seed(p.seed)
        tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
    tokens = tokens.tolist()
    for row, seq in enumerate(seqs):                                # top log-probabilities, when asked
        k = seq.params.logprobs
        if k:
            logp = torch.log_softmax(logits[row].float(), dim=-1)  # (V,)
            top = torch.topk(logp, min(k, logp.shape[0]))
            entry = dict(zip(top.indices.tolist(), top.values.tolist()))
            entry[tokens[row]] = logp[tokens[row]].item()           # the chosen token, always
            seq.logprobs.append(entry)
    return tokens
