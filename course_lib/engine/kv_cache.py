"""The paged KV pool: one K and one V tensor per layer, cut into blocks of token slots.

Layer ``l`` keeps ``k[l]`` and ``v[l]`` of shape ``(num_blocks + 1, block_size, H, Dh)`` (block 0
is the null block, see block_manager.py). Viewed flat as ``(slots, H, Dh)``, slot
``block_id * block_size + offset`` holds one token's key (or value) for every head. Unlike the
reference model's :class:`~course_lib.model.KVCache`, whose ``(B, H, T, Dh)`` tensors grow by
concatenation per request, the pool is allocated once and never moves; requests own blocks of
it through their block tables. Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

import torch

from ..config import GPTConfig


def kv_bytes_per_block(config: GPTConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V, every layer, every head: 2 * n_layer * block_size * H * Dh * element size."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * block_size * config.n_head * config.head_dim * elem


def kv_pool_bytes(config: GPTConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of a pool with ``num_blocks`` usable blocks (plus the null block)."""
    return (num_blocks + 1) * kv_bytes_per_block(config, block_size, dtype)


class PagedKVCache:
    def __init__(self, config: GPTConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        H, Dh = config.n_head, config.head_dim
        # one allocation for the whole pool: (layer, K or V, block, slot in block, head, head dim)
        self.pool = torch.zeros(config.n_layer, 2, num_blocks + 1, block_size, H, Dh, dtype=dtype, device=device)
        self.k = [self.pool[layer, 0] for layer in range(config.n_layer)]   # each (blocks, bs, H, Dh)
        self.v = [self.pool[layer, 1] for layer in range(config.n_layer)]
        self.use_triton = False   # the runner turns on the Triton write kernel on CUDA

    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new tokens' keys and values ``(N, H, Dh)`` into their slots ``(N,)``."""
        if self.use_triton:
            from .triton_cache_write import write_kv

            return write_kv(k, v, slot_mapping, self.k[layer], self.v[layer])
        H, Dh = k.shape[1], k.shape[2]
        self.k[layer].view(-1, H, Dh).index_copy_(0, slot_mapping, k)
        self.v[layer].view(-1, H, Dh).index_copy_(0, slot_mapping, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(S, H, Dh)`` of the tokens in ``slots`` ``(S,)``, in that order."""
        H, Dh = self.config.n_head, self.config.head_dim
        return self.k[layer].view(-1, H, Dh)[slots], self.v[layer].view(-1, H, Dh)[slots]
