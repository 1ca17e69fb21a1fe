"""The Triton paged-decode kernel == the torch reference, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 must be set before the kernel is defined, so the check runs in a fresh
process. Skipped when triton is not installed (it is on every CUDA machine with torch).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import torch
from course_lib.engine.triton_decode import paged_decode_attention
from course_lib.engine.attention import TorchAttention
from course_lib.engine.kv_cache import PagedKVCache
from course_lib.config import GPTConfig

torch.manual_seed(0)
for H, D, bs, dtype in [(2, 32, 4, torch.float32), (3, 48, 7, torch.float32), (2, 64, 16, torch.bfloat16)]:
    cfg = GPTConfig(vocab_size=50, n_positions=80, n_embd=H * D, n_layer=1, n_head=H)
    kv = PagedKVCache(cfg, num_blocks=40, block_size=bs, dtype=dtype)
    kv.pool.normal_()
    lens = [1, bs, bs + 1, 37, 80]
    perm = torch.randperm(40) + 1                     # blocks scattered over the pool
    need = [-(-n // bs) for n in lens]
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start:start + n].to(torch.int32)
        start += n
    tables[:, :][tables == 0] = 0
    q = torch.randn(len(lens), H, D, dtype=dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    got = paged_decode_attention(q, kv.k[0], kv.v[0], tables, lens_t, block_n=16)
    got_auto = paged_decode_attention(q, kv.k[0], kv.v[0], tables.long(), lens_t.long())   # 128-token tiles
    assert (got.float() - got_auto.float()).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)

    class Batch:                                       # what TorchAttention reads
        context_lens_host = lens
        block_tables = tables
    ref = torch.cat([TorchAttention().prefill(q[i:i + 1].float(), None, None,
                     _F32(kv) if dtype != torch.float32 else kv, 0, Batch, i) for i in range(len(lens))])
    err = (got.float() - ref).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert err < tol, (H, D, bs, dtype, err)
    # a padded row (context 0) gives zeros, not NaN
    z = paged_decode_attention(q[:1], kv.k[0], kv.v[0], tables[:1], torch.tensor([0], dtype=torch.int32))
    assert torch.equal(z.float(), torch.zeros_like(z.float()))

# the K/V write kernel == index_copy_, from strided views of a fused QKV output
from course_lib.engine.triton_cache_write import write_kv
for H, D, dtype in [(3, 16, torch.float32), (25, 64, torch.bfloat16)]:
    qkv = torch.randn(11, 3 * H * D, dtype=dtype)
    q, k, v = (t.view(11, H, D) for t in qkv.split(H * D, dim=1))
    cfg = GPTConfig(vocab_size=50, n_positions=80, n_embd=H * D, n_layer=1, n_head=H)
    a, b = PagedKVCache(cfg, num_blocks=6, block_size=4, dtype=dtype), PagedKVCache(cfg, num_blocks=6, block_size=4, dtype=dtype)
    slots = torch.randperm(24)[:11] + 4
    a.write(0, k, v, slots)
    write_kv(k, v, slots, b.k[0], b.v[0])
    assert torch.equal(a.pool, b.pool) and b.pool.abs().sum() > 0

# the whole engine with the Triton backend (decode rows through the kernel) == the reference backend
from course_lib.engine import LLM, SamplingParams
from course_lib.model import GPT
cfg = GPTConfig(vocab_size=97, n_positions=48, n_embd=48, n_layer=2, n_head=3)
torch.manual_seed(1)
model = GPT(cfg).eval()
prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 14, 20)]
p = SamplingParams(max_tokens=6, ignore_eos=True)
want = [o.token_ids for o in LLM(model, device="cpu", block_size=5, attention="torch").generate(prompts, p)]
llm = LLM(model, device="cpu", block_size=5, attention="triton", max_num_batched_tokens=12)
assert [o.token_ids for o in llm.generate(prompts, p)] == want
assert any(r.num_decode_tokens for r in llm.ledger.records)
print("triton interpreter ok")
"""

PRELUDE = r"""
import torch
from course_lib.engine.kv_cache import PagedKVCache
def _F32(kv):
    f = PagedKVCache.__new__(PagedKVCache)
    f.__dict__.update(kv.__dict__)
    f.pool = kv.pool.float()
    f.k = [f.pool[l, 0] for l in range(kv.config.n_layer)]
    f.v = [f.pool[l, 1] for l in range(kv.config.n_layer)]
    return f
"""


def test_paged_decode_kernel_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", PRELUDE + SCRIPT], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "triton interpreter ok" in r.stdout
