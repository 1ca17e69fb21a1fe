"""Every exercise check of notebooks 00-10: a wrong answer fails with a hint that does not give the
answer away, None prints "not answered yet", and the solution prints only "correct"."""

import math

import numpy as np
import pytest
import torch

from course_lib import GPTConfig, perf
from course_lib.exercises import (nb00_start_here as e00, nb01_tokens_and_embeddings as e01, nb02_q_k_v as e02,
                                  nb03_scores_mask_softmax as e03, nb04_multi_head_attention as e04,
                                  nb05_transformer_block as e05, nb06_tiny_gpt as e06, nb07_prefill as e07,
                                  nb08_decode_and_kv_cache as e08, nb09_parallel_and_sync as e09,
                                  nb10_prefill_vs_decode_on_your_hardware as e10)
from course_lib.model import KVCache, gelu, kv_cache_bytes


@pytest.fixture(scope="module")
def tiny():
    from course_lib.tiny import load_tiny

    return load_tiny()


def ids_of(tokenizer, text):
    return torch.tensor([tokenizer.encode(text)])


def fails(check, *args, secret=None):
    """The check raises AssertionError; its hint does not contain ``secret`` (the expected value)."""
    with pytest.raises(AssertionError) as e:
        check(*args)
    msg = str(e.value)
    assert msg and "Tensor-likes" not in msg
    if secret is not None:
        assert f"{secret}" not in msg and f"{secret:,}" not in msg, msg


def passes(capsys, check, *args):
    check(*args)
    assert capsys.readouterr().out.strip() == "correct"


def unanswered(capsys, check, *args):
    check(*args)
    assert "not answered yet" in capsys.readouterr().out


def test_nb00(tiny, capsys):
    model, tok = tiny
    cfg = model.config
    want = kv_cache_bytes(cfg, 8, 100)
    unanswered(capsys, e00.check_cache_bytes, None, cfg)
    for wrong in (want // 4, want // 2, want + 1, "many"):
        fails(e00.check_cache_bytes, wrong, cfg, secret=want)
    passes(capsys, e00.check_cache_bytes, want, cfg)
    ids = ids_of(tok, "Return the number")
    T = ids.shape[1]
    unanswered(capsys, e00.check_keys_seen, None, model, ids, 3)
    for wrong in (T + 2, T, 3):
        fails(e00.check_keys_seen, wrong, model, ids, 3)
    passes(capsys, e00.check_keys_seen, T + 3, model, ids, 3)


def test_nb01(tiny, capsys):
    model, tok = tiny
    wte, wpe = model.transformer.wte.weight.detach(), model.transformer.wpe.weight.detach()
    unanswered(capsys, e01.check_embed, lambda idx: None, model, tok)
    fails(e01.check_embed, lambda idx: wte[idx], model, tok)                         # no positions
    fails(e01.check_embed, lambda idx: wte[idx][:, :, :5], model, tok)               # wrong shape
    passes(capsys, e01.check_embed, lambda idx: wte[idx] + wpe[torch.arange(idx.shape[1])], model, tok)
    n = wte.numel() + wpe.numel()
    for wrong in (wte.numel(), n - 1):
        fails(e01.check_count, wrong, model, secret=n)
    passes(capsys, e01.check_count, n, model)
    for wrong in ("abc", "list", "xqzjvkwp", 7):
        fails(e01.check_word, wrong, tok)
    word = next(t.strip() for t in tok.id_to_token if t.startswith(" ") and t[1:].isalpha() and len(t) >= 7)
    passes(capsys, e01.check_word, word, tok)


def test_nb02(tiny, capsys):
    model, tok = tiny
    ids = ids_of(tok, "The for statement is used")
    D = model.config.n_embd
    from course_lib.model import Trace

    tr = Trace()
    with torch.no_grad():
        model(ids, trace=tr)
    a1 = model.transformer.h[1].attn.c_attn
    right = tr["h1.ln_1"][0] @ a1.weight.detach()[:, D:2 * D] + a1.bias.detach()[D:2 * D]
    wrong_q = tr["h1.ln_1"][0] @ a1.weight.detach()[:, :D] + a1.bias.detach()[:D]
    unanswered(capsys, e02.check_k1, None, model, ids)
    fails(e02.check_k1, wrong_q, model, ids)
    fails(e02.check_k1, right.T, model, ids)
    passes(capsys, e02.check_k1, right, model, ids)
    fails(e02.check_macs, lambda T: T * D * D, D)
    fails(e02.check_macs, lambda T: 2 * T * D * 3 * D, D)
    passes(capsys, e02.check_macs, lambda T: T * 3 * D * D, D)
    for wrong in ({2, 3, 4, 5}, {0, 1, 2}, set(), "2"):
        fails(e02.check_rows, wrong, model)
    passes(capsys, e02.check_rows, {2}, model)


def test_nb03(capsys):
    unanswered(capsys, e03.check_mask, lambda T: None)
    fails(e03.check_mask, lambda T: torch.full((T, T), float("-inf")).tril(-1))
    fails(e03.check_mask, lambda T: torch.zeros(T, T))
    passes(capsys, e03.check_mask, lambda T: torch.full((T, T), float("-inf")).triu(1))
    fails(e03.check_softmax, lambda r: torch.exp(r) / torch.exp(r).sum())               # overflows: NaN
    fails(e03.check_softmax, lambda r: torch.exp(r - r.max()))                          # not normalised
    passes(capsys, e03.check_softmax, lambda r: torch.exp(r - r.max()) / torch.exp(r - r.max()).sum())
    Q = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 1], [1, 0, 2, 1], [0, 1, 1, 0]])
    K = torch.tensor([[1., 0, 1, 0], [0, 1, -1, 0], [0, 0, 1, -1], [1, 1, 1, 2]])
    for wrong in (1.0, 5.0, -0.1, "low"):
        fails(e03.check_tau, wrong, Q, K, 2)
    passes(capsys, e03.check_tau, 0.05, Q, K, 2)


def test_nb04(tiny, capsys):
    model, tok = tiny
    idx = torch.tensor([tok.encode("A list is a sequence")[:3], tok.encode("The for statement")[:3]])
    H = model.config.n_head
    unanswered(capsys, e04.check_merge, lambda t: None, model, idx, 1)
    fails(e04.check_merge, lambda t: t.reshape(t.shape[0], t.shape[2], -1), model, idx, 1)   # heads and tokens mixed
    passes(capsys, e04.check_merge, lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1), model, idx, 1)
    fails(e04.check_n_weights, lambda b, t: b * t * t, model)
    fails(e04.check_n_weights, lambda b, t: b * H * t * (t + 1) // 2, model)
    passes(capsys, e04.check_n_weights, lambda b, t: b * H * t * t, model)
    scores = np.array([[0.1, 0.3], [0.05, 0.4]])
    for wrong in (0, 1, 3, 5):
        fails(e04.check_heads_above_even, wrong, scores, 0.2)
    passes(capsys, e04.check_heads_above_even, 2, scores, 0.2)


def test_nb05(tiny, capsys):
    model, tok = tiny
    ids = ids_of(tok, "The for statement is used")
    blk = model.transformer.h[1]

    def mlp(h, b, act="gelu_new"):
        m = b.mlp
        return gelu(h @ m.c_fc.weight + m.c_fc.bias, act) @ m.c_proj.weight + m.c_proj.bias

    unanswered(capsys, e05.check_mlp, lambda h, b: None, model, ids)
    fails(e05.check_mlp, lambda h, b: mlp(h, b) - b.mlp.c_proj.bias, model, ids)          # bias forgotten
    passes(capsys, e05.check_mlp, mlp, model, ids)
    fails(e05.check_params, lambda D: 12 * D * D, blk)
    fails(e05.check_params, lambda D: 12 * 128 * 128 + 13 * 128 if D == 128 else 0, blk)  # not a formula
    passes(capsys, e05.check_params, lambda D: 12 * D * D + 13 * D, blk)
    fails(e05.check_no_ln, True, model, ids, 1)
    fails(e05.check_no_ln, "no", model, ids, 1)
    passes(capsys, e05.check_no_ln, False, model, ids, 1)


def test_nb06(tiny, capsys):
    model, tok = tiny
    idx = ids_of(tok, "A list is")
    from course_lib.model import Trace

    tr = Trace()
    with torch.no_grad():
        model(idx, trace=tr)
    w = model.transformer.wte.weight.detach()
    unanswered(capsys, e06.check_logits, None, model, idx)
    fails(e06.check_logits, tr["h3.resid_out"] @ w.T, model, idx)                        # ln_f skipped
    fails(e06.check_logits, tr["ln_f"][:, -1] @ w.T, model, idx)                         # last position only
    passes(capsys, e06.check_logits, tr["ln_f"] @ w.T, model, idx)
    small = GPTConfig(vocab_size=model.config.vocab_size, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    cfgs = [model.config, small]

    def right(c):
        D = c.n_embd
        return (c.vocab_size + c.n_positions) * D + c.n_layer * (12 * D * D + 13 * D) + 2 * D

    fails(e06.check_total, lambda c: right(c) - 2 * c.n_embd, cfgs)
    fails(e06.check_total, lambda c: right(c) + c.vocab_size * c.n_embd, cfgs)           # an untied head
    passes(capsys, e06.check_total, right, cfgs)
    for wrong in (1.0, 2.0, 0, -1):
        fails(e06.check_sharp, wrong, model, tok, "A list is")
    passes(capsys, e06.check_sharp, 0.05, model, tok, "A list is")


def test_nb07(tiny, capsys):
    model, tok = tiny
    gpt2_small = GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    want = kv_cache_bytes(gpt2_small, 1, 1024, 2)
    for wrong in (want // 2, want * 2, want - 1):
        fails(e07.check_cache_bytes, wrong, gpt2_small, secret=want)
    passes(capsys, e07.check_cache_bytes, want, gpt2_small)
    idx = ids_of(tok, "To add an item to a list")
    B, T = idx.shape
    D, F = model.config.n_embd, model.config.mlp_dim
    right = 2 * B * T * D * F + B * T * F
    for wrong in (right - B * T * F, B * T * D * F, right + 1):
        fails(e07.check_fc, wrong, model, idx, secret=right)
    passes(capsys, e07.check_fc, right, model, idx)
    frac = (T * (T - 1) / 2) / (T * T)
    for wrong in (0.5, (T * (T + 1) / 2) / (T * T), 1.5):
        fails(e07.check_fraction, wrong, T)
    passes(capsys, e07.check_fraction, frac, T)


def test_nb08(tiny, capsys):
    model, tok = tiny
    seq = ids_of(tok, "To add an item to the end of a list, use")
    cfg = model.config

    def attend(q, K, V, scale=True):
        s = (K @ q[:, :, None])[:, :, 0] / (math.sqrt(q.shape[-1]) if scale else 1.0)
        w = s.softmax(-1)
        return w, (w[:, None, :] @ V)[:, 0]

    unanswered(capsys, e08.check_attend, lambda q, K, V: (None, None), model, seq)
    fails(e08.check_attend, lambda q, K, V: attend(q, K, V, scale=False), model, seq)
    fails(e08.check_attend, lambda q, K, V: (attend(q, K, V)[0], attend(q, K, V)[0]), model, seq)
    passes(capsys, e08.check_attend, attend, model, seq)
    right = 2 * cfg.n_layer * 4 * cfg.n_head * 80 * cfg.head_dim * 4
    for wrong in (right * 50 // 80, right // 4, right // 2):
        fails(e08.check_cache_after, wrong, model, secret=right)
    passes(capsys, e08.check_cache_after, right, model)
    n = 2
    while e08.cached_vs_recompute_flops(cfg, n)[1] <= 50 * e08.cached_vs_recompute_flops(cfg, n)[0]:
        n += 1
    for wrong in (n - 1, n + 1, 1, 2.5):
        fails(e08.check_n, wrong, cfg)
    passes(capsys, e08.check_n, n, cfg)


def test_nb09(tiny, capsys):
    model, tok = tiny
    names = ["A", "B", "C", "D"]
    for causal, no_mask in (({"A", "B"}, {"A", "B", "C", "D"}), ({"A", "B", "C"}, {"A", "B", "C"}),
                            ({"A", "B", "C", "D"}, {"A", "B", "C", "D"}), ({"C"}, {"C"})):
        fails(e09.check_values, causal, no_mask, names)
    passes(capsys, e09.check_values, {"A", "B", "C"}, {"A", "B", "C", "D"}, names)
    long_idx = ids_of(tok, "A tuple is an immutable sequence. Its items cannot be changed.")

    @torch.no_grad()
    def chunked(idx, chunk, return_all=False, drop_last=False):
        cache = KVCache()
        starts = list(range(0, idx.shape[1], chunk))
        for start in starts[:-1] if drop_last else starts:
            logits = model(idx[:, start:start + chunk], kv_cache=cache)
        return (logits if return_all else logits[:, -1]), cache

    unanswered(capsys, e09.check_chunked, lambda idx, chunk: (None, None), model, long_idx, 5)
    fails(e09.check_chunked, lambda idx, chunk: model.prefill(idx), model, long_idx, 5)    # one pass: not chunked
    fails(e09.check_chunked, lambda idx, chunk: chunked(idx, chunk, drop_last=True), model, long_idx, 5)
    fails(e09.check_chunked, lambda idx, chunk: chunked(idx, chunk, return_all=True), model, long_idx, 5)
    fails(e09.check_chunked, lambda idx, chunk: chunked(idx, 2 * chunk), model, long_idx, 5)
    passes(capsys, e09.check_chunked, chunked, model, long_idx, 5)
    for wrong in (1000 * 1001 // 2, 1000 * 1000 // 2, 0):
        fails(e09.check_discarded, wrong, 1000, secret=1000 * 999 // 2)
    passes(capsys, e09.check_discarded, 1000 * 999 // 2, 1000)


def test_nb10(capsys):
    want = 2 * 4096 * 4096 / ((4096 + 4096 * 4096 + 4096) * 2)
    for wrong in (2 * want, 1.0, 2.0):
        fails(e10.check_gemv, wrong)
    passes(capsys, e10.check_gemv, want)
    cfg = perf.bench_config("cpu")
    ridge, elem = 20.0, 4
    b = 1
    while e10.ffn_intensity(cfg, b, elem) < ridge:
        b += 1
    for wrong in (b - 1, b + 1, 0, 1.5):
        fails(e10.check_b, wrong, cfg, ridge, elem)
    passes(capsys, e10.check_b, b, cfg, ridge, elem)
    bw = 20e9
    floor = perf.decode_cost(cfg, 64, bytes_per_element=elem).total_bytes / bw
    for wrong in (floor * 1e3, floor * 2, 0.0):
        fails(e10.check_floor, wrong, cfg, 64, elem, bw)
    passes(capsys, e10.check_floor, floor, cfg, 64, elem, bw)
