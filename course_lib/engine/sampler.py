"""The sampler: one next token per sequence that reached its last known token this step.

Greedy rows are one batched ``argmax``. Rows with ``temperature > 0`` go through the course's
own rules in :mod:`course_lib.sampling` (temperature, top-k, top-p), each with the request's
own random generator when it has a ``seed``: a seeded request draws the same tokens whatever
else shares its batch. The sampler changes nothing but those generators.

Everything is computed on the logits' device and nothing waits for it: :func:`sample` returns a
:class:`DeviceSample` (tokens and log-probabilities as device tensors), the engine keeps the
tokens on the device to feed the next step, and :meth:`DeviceSample.copy_to_host` starts one
non-blocking copy to the host that is read a step later (asynchronous scheduling, engine.py).
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import filter_logits
from .sequence import Sequence

#: the log-probability values of a step in which no row asks for them (never written)
NO_LOGPROBS = torch.zeros(0)


@dataclass
class DeviceSample:
    """One step's sampled tokens ``(R,)`` and, for the rows that ask, their top log-probabilities
    ``(row, top ids (k,), top log-probs (k,), log-prob of the chosen token ())`` — all on the device."""

    tokens: torch.Tensor
    logprobs: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]

    def copy_to_host(self) -> "HostSample":
        """Start the device→host copy (non-blocking, into pinned memory, a CUDA event after it);
        :meth:`HostSample.read` waits for it. On the CPU the tensors are already on the host."""
        ints, floats = self.tokens, NO_LOGPROBS                                  # (R,), no log-probs
        if self.logprobs:
            ints = torch.cat([ints] + [ids for _, ids, _, _ in self.logprobs])    # (R + sum k,)
            floats = torch.cat([torch.cat([vals, chosen.view(1)]) for _, _, vals, chosen in self.logprobs])   # (sum (k + 1),)
        event = None
        if ints.device.type == "cuda":
            # the copy is queued before the next step, which may overwrite the tokens (a graph's buffer)
            host_ints = torch.empty(ints.shape, dtype=ints.dtype, pin_memory=True)
            host_ints.copy_(ints, non_blocking=True)
            if self.logprobs:
                host_floats = torch.empty(floats.shape, dtype=floats.dtype, pin_memory=True)
                host_floats.copy_(floats, non_blocking=True)
                floats = host_floats
            event = torch.cuda.Event()
            event.record()
            ints = host_ints
        elif ints is self.tokens:
            ints = ints.clone()                 # the host's own: the next step may write over the tokens
        layout = [(row, ids.shape[0]) for row, ids, _, _ in self.logprobs]
        return HostSample(self.tokens.shape[0], layout, ints, floats, event)

    def read(self) -> tuple[list[int], list[dict[int, float] | None]]:
        """Tokens and log-probabilities on the host now (waits for the device)."""
        return self.copy_to_host().read()


@dataclass
class HostSample:
    """A step's sampled tokens on their way to the host; :meth:`read` waits for the copy."""

    num_rows: int
    layout: list[tuple[int, int]]     # (row, k) of each row that asked for log-probabilities
    ints: torch.Tensor                # (R + sum k,) tokens, then each row's top ids
    floats: torch.Tensor              # (sum (k + 1),) each row's top log-probs and its chosen token's
    event: object = None              # torch.cuda.Event after the copy (None on the CPU)

    def read(self) -> tuple[list[int], list[dict[int, float] | None]]:
        """R token ids, and per row its ``{token id: log-prob}`` (``None`` where none were asked)."""
        if self.event is not None:
            self.event.synchronize()
        ints, floats = self.ints.tolist(), self.floats.tolist()
        tokens = ints[:self.num_rows]
        logprobs: list[dict[int, float] | None] = [None] * self.num_rows
        i, f = self.num_rows, 0
        for row, k in self.layout:
            entry = dict(zip(ints[i:i + k], floats[f:f + k]))
            entry[tokens[row]] = floats[f + k]                       # the chosen token, always
            logprobs[row] = entry
            i, f = i + k, f + k + 1
        return tokens, logprobs


def sample(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None) -> DeviceSample:
    """``logits`` (R, V), one row per sequence in ``seqs`` → R token ids and the top log-probabilities
    asked for (``SamplingParams.logprobs``), on the logits' device; no host synchronisation.
    ``greedy`` (R,): every row's argmax, already computed (a step graph's, step_graphs.py); the
    rows that do not sample greedily are then written over in it."""
    tokens = logits.argmax(dim=-1) if greedy is None else greedy    # (R,) greedy for every row
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
    logprobs = []
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
        if not k:
            continue
        logp = torch.log_softmax(logits[row].float(), dim=-1)      # (V,)
        top = torch.topk(logp, min(k, logp.shape[0]))
        chosen = logp.gather(0, tokens[row:row + 1])[0]              # () no host read of the token
        logprobs.append((row, top.indices, top.values, chosen))
    return DeviceSample(tokens, logprobs)
