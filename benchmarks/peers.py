"""What an inference engineer writes in an afternoon: GPT-2 in plain PyTorch, the gpt-fast recipe.

The peer the engine is measured against in ``bench_engine.py`` (systems "torch-graph" and
"torch-compile"). It runs a ``course_lib.model.GPT``'s own modules and weights (nothing is
copied) with

* a static KV cache preallocated for ``(batch, max_len)``: per layer K and V of shape
  ``(B, H, max_len, Dh)``, written in place with ``index_copy_`` at the positions given;
* ``prefill`` of a ``(B, T)`` batch from position 0 (causal attention over the T new tokens);
* a decode step of fixed shapes: the token ids ``(B,)`` and the position ``(1,)`` are device
  tensors, attention runs over all ``max_len`` slots with a mask, the greedy argmax is inside,
  and the step writes its token and next position back into its own inputs, so one CUDA graph
  per batch size replays step after step with nothing done on the host;
* ``compile=True``: the decode step and prefill go through ``torch.compile(fullgraph=True)``
  first (the decode step is then graph-captured); ``compile_seconds`` says what it cost.

Without CUDA the same code runs eagerly (no graphs). ``generate`` is the greedy loop.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from course_lib.errors import InputError


class StaticCacheGPT:
    """Greedy GPT-2 with a static KV cache for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(self, model, batch: int, max_len: int, compile: bool = False, graphs: bool | None = None):
        self.model = model.eval()
        cfg = model.config
        w = model.transformer.wte.weight
        self.device, self.dtype = w.device, w.dtype
        if max_len > cfg.n_positions:
            raise InputError(f"max_len={max_len} exceeds the model's n_positions={cfg.n_positions}")
        self.batch, self.max_len = batch, max_len
        self.H, self.Dh, self.D = cfg.n_head, cfg.head_dim, cfg.n_embd
        shape = (batch, self.H, max_len, self.Dh)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.slots = torch.arange(max_len, device=self.device)                     # (max_len,)
        # the decode step's inputs and outputs, fixed addresses for the CUDA graph
        self.next_ids = torch.zeros(batch, dtype=torch.long, device=self.device)   # (B,)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)            # (1,)
        self.tokens = torch.zeros(batch, max_len + 1, dtype=torch.long, device=self.device)
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        self.compiled = compile
        self.compile_seconds = 0.0
        self._step = self._decode_step
        self._prefill = self._prefill_logits
        if compile:
            self._step = torch.compile(self._decode_step, fullgraph=True, dynamic=False)
            self._prefill = torch.compile(self._prefill_logits, fullgraph=True, dynamic=False)
        self._graph = None
        self._at = 0

    # ------------------------------------------------------------------ the forward, compact
    def _forward(self, idx, pos, causal: bool):
        """Logits of the last position ``(B, V)`` for tokens ``idx`` (B, T) at positions ``pos`` (T,)."""
        t = self.model.transformer
        B, T = idx.shape
        x = t.wte(idx) + t.wpe(pos)                                             # (B, T, D)
        for i, block in enumerate(t.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.D, dim=2)    # 3 x (B, T, D)
            q, k, v = (z.view(B, T, self.H, self.Dh).transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            if causal:                                   # prefill from 0: the new tokens are all there is
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:                                        # decode: every slot, masked past the position
                mask = self.slots[None, :] <= pos[:, None]                      # (T, max_len)
                a = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            x = x + block.attn.c_proj(a.transpose(1, 2).reshape(B, T, self.D))  # (B, T, D)
            x = x + block.mlp(block.ln_2(x))
        return self.model.lm_head(t.ln_f(x[:, -1]))                            # (B, V)

    def _prefill_logits(self, idx, pos):
        return self._forward(idx, pos, causal=True)

    def _decode_step(self, next_ids, pos):
        """One token per sequence at position ``pos``: the greedy next ids ``(B,)``."""
        return self._forward(next_ids[:, None], pos, causal=False).argmax(-1)

    def _advance(self):
        """Decode step, then feed the result back: the step's own inputs become the next step's."""
        nxt = self._step(self.next_ids, self.pos)                              # (B,)
        self.tokens.index_copy_(1, self.pos + 1, nxt[:, None])
        self.next_ids.copy_(nxt)
        self.pos.add_(1)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, idx, compiled: bool = True) -> torch.Tensor:
        """Fill the cache with prompts ``idx`` (B, T); returns the first greedy ids ``(B,)`` and
        leaves them, with position T, as the next decode step's inputs. ``compiled=False`` runs
        eagerly even on a compiled peer (to fill the cache without compiling one more shape)."""
        idx = torch.as_tensor(idx, device=self.device)
        B, T = idx.shape
        if B != self.batch or T >= self.max_len:
            raise InputError(f"prompts of shape {(B, T)} do not fit this peer's batch {self.batch} "
                             f"and max_len {self.max_len}")
        fn = self._prefill if compiled else self._prefill_logits
        nxt = fn(idx, torch.arange(T, device=self.device)).argmax(-1)         # (B,)
        self.tokens[:, :T] = idx
        self.tokens[:, T] = nxt
        self.next_ids.copy_(nxt)
        self.pos.fill_(T)
        self._at = T                                     # the host's copy of pos, for the bound check
        return nxt

    @torch.no_grad()
    def capture(self, warmup: int = 3) -> float:
        """Warm up (compiling if ``compile``) and, with CUDA graphs, capture one decode step.
        Returns the seconds it took; a compiled peer keeps them in ``compile_seconds``.
        The warm-up writes cache slots: call ``prefill`` afterwards."""
        t = time.perf_counter()
        self.pos.fill_(0)
        if self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._advance()
            torch.cuda.current_stream().wait_stream(side)
            self.pos.fill_(0)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._advance()
            torch.cuda.synchronize()
        else:
            for _ in range(warmup if self.compiled else 1):
                self._advance()
        secs = time.perf_counter() - t
        if self.compiled:
            self.compile_seconds += secs
        return secs

    @torch.no_grad()
    def step(self) -> None:
        """One decode step from the current inputs (a graph replay when captured)."""
        if self._at >= self.max_len:
            raise InputError(f"the cache of {self.max_len} slots is full")
        self._at += 1
        if self._graph is not None:
            self._graph.replay()
        else:
            self._advance()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int) -> torch.Tensor:
        """Greedy: prompts ``(B, T)`` → ``(B, T + max_new_tokens)``, as ``GPT.generate``."""
        idx = torch.as_tensor(idx, device=self.device)
        T = idx.shape[1]
        if T + max_new_tokens > self.max_len:
            raise InputError(f"{T} + {max_new_tokens} tokens exceed max_len={self.max_len}")
        self.prefill(idx)
        for _ in range(max_new_tokens - 1):
            self.step()
        return self.tokens[:, :T + max_new_tokens].clone()


def compile_timed(peer: StaticCacheGPT, idx) -> float:
    """Seconds of a compiled peer's first prefill of ``idx``'s shape (compilation included)."""
    t = time.perf_counter()
    peer.prefill(idx)
    if peer.device.type == "cuda":
        torch.cuda.synchronize(peer.device)
    secs = time.perf_counter() - t
    if peer.compiled:
        peer.compile_seconds += secs
    return secs
