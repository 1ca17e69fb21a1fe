"""The reference model's invariants (prefill == full forward, cached decode == recompute, causality, per-token Q/K/V == one matmul), for random configs."""

import torch

from conftest import random_model
from course_lib.model import KVCache, Trace, kv_cache_bytes

ATOL = 1e-5


def _prompt(config, T=None, batch=2, seed=0):
    T = T or config.n_positions // 2
    return torch.randint(0, config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_prefill_last_row_equals_full_forward(random_config):
    """Invariant 2."""
    model = random_model(random_config)
    idx = _prompt(random_config)
    logits, cache = model.prefill(idx)
    with torch.no_grad():
        full = model(idx)
    assert logits.shape == (2, random_config.vocab_size)
    torch.testing.assert_close(logits, full[:, -1], atol=ATOL, rtol=0)
    assert cache.seq_len == idx.shape[1]
    assert cache.keys[0].shape == (2, random_config.n_head, idx.shape[1], random_config.head_dim)


def test_decode_with_cache_equals_recomputation(random_config):
    """Invariant 3: every decode step from the cache equals a full recomputation."""
    model = random_model(random_config)
    idx = _prompt(random_config, T=max(1, random_config.n_positions // 2))
    logits, cache = model.prefill(idx)
    for _ in range(random_config.n_positions - idx.shape[1]):
        nxt = logits.argmax(-1)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        logits = model.decode_step(nxt, cache)
        with torch.no_grad():
            recomputed = model(idx)[:, -1]
        torch.testing.assert_close(logits, recomputed, atol=ATOL, rtol=0)
    assert cache.seq_len == random_config.n_positions


def test_causality(random_config):
    """Invariant 4: changing token j changes nothing at positions < j, in any layer."""
    model = random_model(random_config)
    idx = _prompt(random_config)
    j = idx.shape[1] // 2
    changed = idx.clone()
    changed[:, j] = (changed[:, j] + 1) % random_config.vocab_size
    a, b = Trace(), Trace()
    with torch.no_grad():
        model(idx, trace=a)
        model(changed, trace=b)
    for i in range(random_config.n_layer):
        before, after = a[f"h{i}.resid_out"], b[f"h{i}.resid_out"]
        assert torch.equal(before[:, :j], after[:, :j])
        assert not torch.equal(before[:, j], after[:, j])
    assert torch.equal(a["logits"][:, :j], b["logits"][:, :j])


def test_qkv_loop_equals_one_matmul(random_config):
    """Invariant 5: projecting token by token gives the same Q, K, V as one batched matmul."""
    model = random_model(random_config)
    idx = _prompt(random_config, batch=1)
    trace = Trace()
    with torch.no_grad():
        model(idx, trace=trace)
        x = trace["h0.ln_1"][0]                                      # (T, D)
        attn = model.transformer.h[0].attn
        W, b = attn.c_attn.weight, attn.c_attn.bias
        per_token = torch.stack([x[t] @ W + b for t in range(x.shape[0])])   # (T, 3D)
    D, H = random_config.n_embd, random_config.n_head
    q = per_token[:, :D].view(-1, H, D // H).transpose(0, 1)        # (H, T, Dh)
    k = per_token[:, D:2 * D].view(-1, H, D // H).transpose(0, 1)
    torch.testing.assert_close(q, trace["h0.attn.q"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(k, trace["h0.attn.k"][0], atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_pass(random_config):
    model = random_model(random_config)
    idx = _prompt(random_config)
    logits, cache = model.prefill(idx)
    chunked = KVCache()
    with torch.no_grad():
        for start in range(0, idx.shape[1], 3):
            out = model(idx[:, start:start + 3], kv_cache=chunked)
    torch.testing.assert_close(out[:, -1], logits, atol=ATOL, rtol=0)
    for k1, k2 in zip(cache.keys, chunked.keys):
        torch.testing.assert_close(k1, k2, atol=ATOL, rtol=0)


def test_kv_cache_bytes_formula_equals_allocation(random_config):
    """Invariant 7 (reference cache)."""
    model = random_model(random_config)
    idx = _prompt(random_config, batch=3)
    _, cache = model.prefill(idx)
    assert cache.nbytes() == kv_cache_bytes(random_config, batch=3, seq_len=idx.shape[1])


def test_trace_records_every_documented_name(random_config):
    from course_lib.model import TRACE_SHAPES

    model = random_model(random_config)
    trace = Trace()
    with torch.no_grad():
        model(_prompt(random_config), trace=trace)
    for name in TRACE_SHAPES:
        names = [name.format(i=i) for i in range(random_config.n_layer)] if "{i}" in name else [name]
        for n in names:
            assert n in trace, n
    assert trace["h0.attn.weights"].sum(-1).allclose(torch.ones(1))
    assert trace.layer(0)["attn.q"].shape == trace["h0.attn.q"].shape


def test_trace_is_off_by_default(random_config):
    model = random_model(random_config)
    with torch.no_grad():
        a = model(_prompt(random_config))
        b = model(_prompt(random_config), trace=Trace())
    assert torch.equal(a, b)
