"""The paged KV pool: one K and one V tensor per layer, cut into blocks of token slots.

Layer ``l`` keeps ``k[l]`` and ``v[l]`` of shape ``(num_blocks + 1, block_size, H, Dh)`` (block 0
is the null block, see block_manager.py). Viewed flat as ``(slots, H, Dh)``, slot
``block_id * block_size + offset`` holds one token's key (or value) for every head. Unlike the
reference model's :class:`~course_lib.model.KVCache`, whose ``(B, H, T, Dh)`` tensors grow by
concatenation per request, the pool is allocated once and never moves; requests own blocks of
it through their block tables. :func:`plan_num_blocks` decides how many blocks fit.
"""

from __future__ import annotations

import gc
import math
import os

import torch

from ..config import GPTConfig
from ..errors import ConfigError
from ..model import kv_cache_bytes
from .config import EngineConfig

CPU_DEFAULT_KV_BYTES = 256 * 2**20     # default pool cap on CPU


def kv_bytes_per_block(config: GPTConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of ``block_size`` tokens, every layer and head (the reference cache's formula)."""
    return kv_cache_bytes(config, 1, block_size, torch.empty((), dtype=dtype).element_size())


def plan_num_blocks(model: GPTConfig, cfg: EngineConfig) -> int:
    """Usable blocks of the pool for a resolved config: ``num_kv_blocks`` if given; else enough for
    ``max_num_seqs`` full-context requests — capped at 256 MiB on CPU, and on CUDA only where that
    fits in free memory — or on CUDA what ``gpu_memory_fraction`` (default 0.9) of the GPU leaves
    after the weights and one step's activations (always, when the fraction is given)."""
    per_block = kv_bytes_per_block(model, cfg.block_size, cfg.dtype) // cfg.tensor_parallel_size   # this rank's heads
    if cfg.num_kv_blocks is not None:
        need, room = (cfg.num_kv_blocks + 1) * per_block, memory_available(cfg.device)
        if need > room:
            raise ConfigError(f"num_kv_blocks={cfg.num_kv_blocks} needs {need / 2**30:.1f} GiB for the KV pool "
                              f"({per_block:,} bytes a block) but this {cfg.device.type} has "
                              f"{room / 2**30:.1f} GiB available; ask for at most {max(1, room // per_block - 1)}")
        return cfg.num_kv_blocks
    full = cfg.max_num_seqs * math.ceil(model.n_positions / cfg.block_size)   # every request at full context
    if cfg.device.type != "cuda":
        return max(1, min(full, CPU_DEFAULT_KV_BYTES // per_block))
    fraction = 0.9 if cfg.gpu_memory_fraction is None else cfg.gpu_memory_fraction
    gc.collect()                       # engines dropped but still in reference cycles give memory back
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(cfg.device)
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    # room for one step's activations: the widest tensors are the MLP hidden and the logits
    activations = (cfg.max_num_batched_tokens * (model.mlp_dim + 6 * model.n_embd) * elem * 4
                   + cfg.max_num_seqs * model.vocab_size * 4 * 4 + 512 * 2**20)
    if cfg.gpu_memory_fraction is None and (full + 1) * per_block + activations < free:
        return full                    # no more than can ever be used: other engines in this process keep room
    blocks = int((fraction * total - (total - free) - activations) // per_block)
    if blocks < 1:
        raise ConfigError(f"gpu_memory_fraction={fraction} leaves no memory for the KV cache "
                          f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after the weights); "
                          "raise it, or lower max_num_batched_tokens")
    return blocks


def memory_available(device: torch.device) -> int:
    """Bytes a new allocation can take: free GPU memory, or this machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PagedKVCache:
    def __init__(self, config: GPTConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 triton_write: bool = False, num_heads: int | None = None):
        """``num_heads``: the heads this pool holds (a tensor-parallel rank's share; all by default)."""
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_heads = H = num_heads or config.n_head
        Dh = config.head_dim
        # one allocation for the whole pool: (layer, K or V, block, slot in block, head, head dim)
        self.pool = torch.zeros(config.n_layer, 2, num_blocks + 1, block_size, H, Dh, dtype=dtype, device=device)
        self.k = [self.pool[layer, 0] for layer in range(config.n_layer)]   # each (blocks, bs, H, Dh)
        self.v = [self.pool[layer, 1] for layer in range(config.n_layer)]
        self.triton_write = triton_write    # the Triton write kernel (GPU); index_copy_ otherwise

    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new tokens' keys and values ``(N, H, Dh)`` into their slots ``(N,)``."""
        if self.triton_write:
            from .triton_cache_write import write_kv

            return write_kv(k, v, slot_mapping, self.k[layer], self.v[layer])
        H, Dh = k.shape[1], k.shape[2]
        self.k[layer].view(-1, H, Dh).index_copy_(0, slot_mapping, k)
        self.v[layer].view(-1, H, Dh).index_copy_(0, slot_mapping, v)
