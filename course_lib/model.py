"""The reference GPT: GPT-2's architecture in plain, readable PyTorch.

Read it top to bottom; every notebook points into it.

* learned token embeddings ``wte`` and position embeddings ``wpe`` (notebooks/01)
* ``n_layer`` pre-LN blocks: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (notebooks/05).
  GPT-2 normalises *before* attention and the MLP, not after (the "post-LN" of the original
  Transformer paper).
* causal multi-head self-attention written out step by step: scores, scale, mask, softmax,
  weighted sum of values, merge heads, output projection (notebooks/02-04)
* a final LayerNorm ``ln_f`` and an LM head that shares its weight with ``wte`` (notebooks/06)

Parameter names and layouts are Hugging Face's ``GPT2LMHeadModel``: linear layers are
"Conv1D" (``y = x @ W + b`` with ``W`` of shape ``(in, out)``), so a ``state_dict`` moves
between the two without renaming.

Prefill and decode are one computation, :meth:`GPT.forward` over new tokens with a
:class:`KVCache` of the tokens before them (notebooks/07 and 08). An opt-in :class:`Trace`
records every intermediate for the notebooks to plot; when it is off, nothing is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .errors import InputError

# --------------------------------------------------------------------------- the trace

#: Every name a :class:`Trace` records, with its shape. ``{i}`` is the layer index.
#: B = batch, T = new tokens in this call, S = keys visible (cached + new), D = n_embd,
#: H = n_head, Dh = head_dim, F = MLP width, V = vocab_size.
TRACE_SHAPES = {
    "embed.tok": "(B, T, D)   token embeddings wte[idx]",
    "embed.pos": "(T, D)      position embeddings wpe[pos]",
    "embed.sum": "(B, T, D)   tok + pos: the input of block 0",
    "h{i}.ln_1": "(B, T, D)   LayerNorm before attention",
    "h{i}.attn.q": "(B, H, T, Dh) queries, one row per new token",
    "h{i}.attn.k": "(B, H, S, Dh) keys: cached prefix + new tokens",
    "h{i}.attn.v": "(B, H, S, Dh) values: cached prefix + new tokens",
    "h{i}.attn.scores": "(B, H, T, S) raw q . k",
    "h{i}.attn.scaled": "(B, H, T, S) scores / sqrt(Dh)",
    "h{i}.attn.mask": "(T, S)      True where a query may see a key (causal)",
    "h{i}.attn.masked": "(B, H, T, S) scaled, -inf where the mask is False",
    "h{i}.attn.weights": "(B, H, T, S) row softmax of masked: each row sums to 1",
    "h{i}.attn.head_out": "(B, H, T, Dh) weights @ v, per head",
    "h{i}.attn.merged": "(B, T, D)   heads concatenated back, before W_o",
    "h{i}.attn.out": "(B, T, D)   merged @ W_o + b_o (c_proj)",
    "h{i}.resid_mid": "(B, T, D)   x + attention output",
    "h{i}.ln_2": "(B, T, D)   LayerNorm before the MLP",
    "h{i}.mlp.pre_act": "(B, T, F)   ln_2 @ W_fc + b_fc",
    "h{i}.mlp.hidden": "(B, T, F)   GELU(pre_act)",
    "h{i}.mlp.out": "(B, T, D)   hidden @ W_proj + b_proj",
    "h{i}.resid_out": "(B, T, D)   resid_mid + MLP output: the output of block i",
    "ln_f": "(B, T, D)   final LayerNorm",
    "logits": "(B, T, V) or (B, V) with last_only",
}


class Trace:
    """Records named intermediates of one forward pass (opt-in, for the notebooks).

    >>> trace = Trace()
    >>> logits = model(idx, trace=trace)
    >>> trace["h0.attn.weights"].shape   # (B, H, T, S)

    Introduced in notebooks/02_q_k_v.ipynb. :data:`TRACE_SHAPES` documents every name.
    """

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def record(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().clone()

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{name!r} was not recorded; recorded names: {list(self.tensors)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """The intermediates of block ``i``, without the ``h{i}.`` prefix."""
        prefix = f"h{i}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _record(trace: Trace | None, name: str, tensor: torch.Tensor) -> None:
    if trace is not None:
        trace.record(name, tensor)


# --------------------------------------------------------------------------- the KV cache


@dataclass
class KVCache:
    """Per-layer keys and values of every token seen so far: the state decode needs.

    ``keys[i]`` and ``values[i]`` have shape ``(B, H, T, Dh)``. Prefill fills it for the whole
    prompt; each decode step appends one position. Introduced in notebooks/07_prefill.ipynb.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int | None:
        return self.keys[0].shape[0] if self.keys else None

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Add the new positions of ``layer``; returns all keys and values of that layer."""
        if layer == len(self.keys):
            self.keys.append(k_new)
            self.values.append(v_new)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k_new], dim=2)      # (B, H, S, Dh)
            self.values[layer] = torch.cat([self.values[layer], v_new], dim=2)  # (B, H, S, Dh)
        return self.keys[layer], self.values[layer]

    def nbytes(self) -> int:
        """Bytes held by the tensors: 2 * n_layer * B * H * T * Dh * element size."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def clone(self) -> "KVCache":
        return KVCache([k.clone() for k in self.keys], [v.clone() for v in self.values])


def kv_cache_bytes(config: GPTConfig, batch: int, seq_len: int, bytes_per_element: int = 4) -> int:
    """KV-cache size by formula: K and V, per layer, per head, per position, per head dim."""
    return 2 * config.n_layer * batch * config.n_head * seq_len * config.head_dim * bytes_per_element


# --------------------------------------------------------------------------- layers


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``y = x @ weight + bias`` with ``weight`` of shape ``(in, out)``."""

    def __init__(self, n_in: int, n_out: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out, device=device))
        self.bias = nn.Parameter(torch.zeros(n_out, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """``(n_queries, n_keys)`` bool mask for the *last* ``n_queries`` of ``n_keys`` positions.

    Query ``i`` sits at absolute position ``n_keys - n_queries + i`` and may see keys at
    positions ``<=`` its own. With ``n_queries == n_keys`` this is the lower triangle
    (notebooks/03); with one query (decode) every key is visible (notebooks/08).
    """
    offset = n_keys - n_queries
    q_pos = torch.arange(n_queries, device=device)[:, None] + offset
    k_pos = torch.arange(n_keys, device=device)[None, :]
    return k_pos <= q_pos


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, device=None):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd, device)  # W_q | W_k | W_v side by side
        self.c_proj = Conv1D(config.n_embd, config.n_embd, device)      # W_o
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x, kv_cache: KVCache | None = None, trace: Trace | None = None):
        B, T, D = x.shape
        name = f"h{self.layer_idx}.attn."
        q, k, v = self.c_attn(x).split(D, dim=2)                 # 3 x (B, T, D)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, H, T, Dh)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)          # (B, H, S, Dh), S = past + T
        S = k.shape[2]

        scores = q @ k.transpose(-2, -1)                          # (B, H, T, S)
        scaled = scores / math.sqrt(self.head_dim)
        mask = causal_mask(T, S, device=x.device)                 # (T, S)
        masked = scaled.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(masked, dim=-1)                   # (B, H, T, S), rows sum to 1
        head_out = self.attn_dropout(weights) @ v                 # (B, H, T, Dh)
        merged = head_out.transpose(1, 2).reshape(B, T, D)        # (B, T, D)
        out = self.resid_dropout(self.c_proj(merged))

        if trace is not None:
            for key, t in (("q", q), ("k", k), ("v", v), ("scores", scores), ("scaled", scaled),
                           ("mask", mask), ("masked", masked), ("weights", weights),
                           ("head_out", head_out), ("merged", merged), ("out", out)):
                trace.record(name + key, t)
        return out


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind in ("gelu_new", "gelu_pytorch_tanh"):  # GPT-2's tanh approximation
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if kind == "gelu":
        return F.gelu(x)
    return F.relu(x)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, device=None):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.mlp_dim, device)
        self.c_proj = Conv1D(config.mlp_dim, config.n_embd, device)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.activation = config.activation_function
        self.layer_idx = layer_idx

    def forward(self, x, trace: Trace | None = None):
        pre_act = self.c_fc(x)                                    # (B, T, F)
        hidden = gelu(pre_act, self.activation)
        out = self.dropout(self.c_proj(hidden))                   # (B, T, D)
        name = f"h{self.layer_idx}.mlp."
        _record(trace, name + "pre_act", pre_act)
        _record(trace, name + "hidden", hidden)
        _record(trace, name + "out", out)
        return out


class Block(nn.Module):
    """One pre-LN transformer block (notebooks/05_transformer_block.ipynb)."""

    def __init__(self, config: GPTConfig, layer_idx: int, device=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, device=device)
        self.attn = CausalSelfAttention(config, layer_idx, device)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, device=device)
        self.mlp = MLP(config, layer_idx, device)
        self.layer_idx = layer_idx

    def forward(self, x, kv_cache: KVCache | None = None, trace: Trace | None = None):
        name = f"h{self.layer_idx}."
        h = self.ln_1(x)
        _record(trace, name + "ln_1", h)
        x = x + self.attn(h, kv_cache, trace)
        _record(trace, name + "resid_mid", x)
        h = self.ln_2(x)
        _record(trace, name + "ln_2", h)
        x = x + self.mlp(h, trace)
        _record(trace, name + "resid_out", x)
        return x


class Transformer(nn.Module):
    """Embeddings, blocks and final norm: HF's ``GPT2Model`` (named ``transformer`` in the LM)."""

    def __init__(self, config: GPTConfig, device=None):
        super().__init__()
        # uninitialised tables (reset_parameters or a checkpoint fills them; on "meta" nothing is drawn)
        self.wte = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.n_embd, device=device),
                                                freeze=False)
        self.wpe = nn.Embedding.from_pretrained(torch.empty(config.n_positions, config.n_embd, device=device),
                                                freeze=False)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i, device) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, device=device)


# --------------------------------------------------------------------------- the model


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every stored tensor (HF GPT-2 names; the tied lm_head is not stored)."""
    D, F, V = config.n_embd, config.mlp_dim, config.vocab_size
    shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (config.n_positions, D)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (D,), p + "ln_1.bias": (D,),
            p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
            p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
            p + "ln_2.weight": (D,), p + "ln_2.bias": (D,),
            p + "mlp.c_fc.weight": (D, F), p + "mlp.c_fc.bias": (F,),
            p + "mlp.c_proj.weight": (F, D), p + "mlp.c_proj.bias": (D,),
        })
    shapes.update({"transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)})
    return shapes


class GPT(nn.Module):
    """GPT-2 language model with a tied LM head (HF ``GPT2LMHeadModel`` layout).

    Introduced in notebooks/06_tiny_gpt.ipynb; prefill and decode in notebooks/07 and 08.
    """

    def __init__(self, config: GPTConfig, device=None):
        """``device="meta"`` makes the modules without memory or random values, for weights that are
        then loaded from a file (course_lib.checkpoint)."""
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, device)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialisation: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer), generator=gen)
            else:
                nn.init.normal_(p, 0.0, std, generator=gen)

    # ------------------------------------------------------------------ checks
    def check_token_ids(self, idx, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Return ``idx`` as a ``(B, T)`` long tensor, or raise :class:`InputError` saying why."""
        if not isinstance(idx, torch.Tensor):
            try:
                idx = torch.as_tensor(idx)
            except (TypeError, ValueError) as e:
                raise InputError(f"token ids must be a tensor or nested list of ints ({e})") from None
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise InputError(f"token ids must be integers, got dtype {idx.dtype}; "
                             "pass the output of the tokenizer (torch.long)")
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.dim() != 2:
            raise InputError(f"token ids must have shape (T,) or (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if B == 0 or T == 0:
            raise InputError(f"token ids are empty (shape {tuple(idx.shape)}); give at least one token")
        V = self.config.vocab_size
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range: this model's vocabulary has ids 0..{V - 1}")
        past = kv_cache.seq_len if kv_cache is not None else 0
        if past + T > self.config.n_positions:
            raise InputError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) is longer than the model's "
                f"context of n_positions={self.config.n_positions}; shorten the prompt")
        if kv_cache is not None and kv_cache.batch_size not in (None, B):
            raise InputError(f"batch of {B} sequences does not match the cache's batch of {kv_cache.batch_size}")
        return idx.to(device=self.transformer.wte.weight.device, dtype=torch.long)

    # ------------------------------------------------------------------ compute
    def forward(self, idx, kv_cache: KVCache | None = None, trace: Trace | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for the tokens ``idx`` (B, T), continuing after whatever ``kv_cache`` holds.

        * no cache: the full forward pass over the sequence, logits ``(B, T, V)``;
        * an empty cache: prefill; the cache is filled with every layer's K and V;
        * a filled cache: the new tokens attend to the cached ones (chunked prefill, decode).

        ``last_only`` applies the LM head to the last position only and returns ``(B, V)``:
        that is all prefill needs to pick the first new token.
        """
        idx = self.check_token_ids(idx, kv_cache)
        B, T = idx.shape
        start = kv_cache.seq_len if kv_cache is not None else 0
        pos = torch.arange(start, start + T, device=idx.device)
        tok_emb = self.transformer.wte(idx)                         # (B, T, D)
        pos_emb = self.transformer.wpe(pos)                         # (T, D)
        x = self.transformer.drop(tok_emb + pos_emb)                # (B, T, D)
        _record(trace, "embed.tok", tok_emb)
        _record(trace, "embed.pos", pos_emb)
        _record(trace, "embed.sum", x)
        for block in self.transformer.h:
            x = block(x, kv_cache, trace)                           # layer L+1 waits for layer L
        x = self.transformer.ln_f(x)
        _record(trace, "ln_f", x)
        if last_only:
            x = x[:, -1, :]                                         # (B, D)
        logits = self.lm_head(x)                                    # (B, T, V) or (B, V)
        _record(trace, "logits", logits)
        return logits

    @torch.no_grad()
    def prefill(self, idx, trace: Trace | None = None) -> tuple[torch.Tensor, KVCache]:
        """Process a whole prompt: first-token logits ``(B, V)`` and the filled KV cache."""
        cache = KVCache()
        logits = self(idx, kv_cache=cache, trace=trace, last_only=True)
        return logits, cache

    @torch.no_grad()
    def decode_step(self, next_ids, kv_cache: KVCache, trace: Trace | None = None) -> torch.Tensor:
        """One decode step: ``next_ids`` (B,) or (B, 1) → logits ``(B, V)``; appends to the cache."""
        if not kv_cache.keys:
            raise InputError("decode_step needs a cache filled by prefill first")
        next_ids = torch.as_tensor(next_ids)
        if next_ids.dim() == 1:
            next_ids = next_ids[:, None]
        if next_ids.dim() != 2 or next_ids.shape[1] != 1:
            raise InputError(f"decode_step takes one token per sequence, shape (B,) or (B, 1); "
                             f"got {tuple(next_ids.shape)}")
        return self(next_ids, kv_cache=kv_cache, trace=trace, last_only=True)

    def loss(self, idx, targets) -> torch.Tensor:
        """Mean next-token cross-entropy of ``idx`` predicting ``targets`` (both (B, T))."""
        logits = self(idx)
        targets = torch.as_tensor(targets, device=logits.device)
        if targets.shape != logits.shape[:2]:
            raise InputError(f"targets of shape {tuple(targets.shape)} do not match inputs {tuple(logits.shape[:2])}")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Prompt ``(B, T)`` → ``(B, T + max_new_tokens)``; greedy when ``temperature == 0``.

        With ``use_cache=False`` every step recomputes the whole sequence (notebooks/08 times both).
        """
        from .sampling import check_sampling_args, sample_next

        check_sampling_args(max_new_tokens, temperature, top_k)
        idx = self.check_token_ids(idx)
        if idx.shape[1] + max_new_tokens > self.config.n_positions:
            raise InputError(
                f"prompt of {idx.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"context of {self.config.n_positions}; generate fewer tokens or shorten the prompt")
        gen = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        if use_cache:
            logits, cache = self.prefill(idx)
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(idx)[:, -1, :]
            nxt = sample_next(logits, temperature, top_k, gen)     # (B,)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if use_cache and step < max_new_tokens - 1:
                logits = self.decode_step(nxt, cache)
        self.train(was_training)
        return idx

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out wte and wpe (the FLOP formula's N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n
