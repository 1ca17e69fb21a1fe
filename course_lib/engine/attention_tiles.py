"""The tile table of the unified attention kernel, built on the host (no Triton needed).

The kernel in triton_unified.py runs one program per (tile, head); a tile is ``BLOCK_M``
consecutive query rows of *one* sequence. Before each step the host lists the tiles — which
sequence, which first row — in O(number of tiles); the kernel reads that list from the device.
Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations


def tile_rows_for(num_tokens: int) -> int:
    """Query rows per tile. Small steps are mostly decodes (one row per sequence): 16, the smallest
    ``tl.dot`` tile, wastes least; big steps are prefills: 64 rows share each loaded key block."""
    return 16 if num_tokens <= 256 else 64


def max_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """An upper bound on the tiles of any step with these totals: ``sum ceil(q_i / BLOCK_M)``
    ``<= (num_tokens + num_seqs * (BLOCK_M - 1)) / BLOCK_M``, and a tile holds at least one row."""
    return max(1, min(num_tokens, (num_tokens + num_seqs * (block_m - 1)) // block_m))


def build_tiles(query_start: list[int], context_lens: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """``(tile_seq, tile_row)``: the sequence and first flat query row of every tile, O(tiles).

    Tiles that read the most keys go first, so the long ones start early and the short ones fill in.
    """
    tiles = []
    for s, (a, b) in enumerate(zip(query_start, query_start[1:])):
        prefix = context_lens[s] - (b - a)
        for r in range(a, b, block_m):
            keys = prefix + min(r + block_m, b) - a             # the tile's last position + 1
            tiles.append((-keys, s, r))
    tiles.sort()
    return [s for _, s, _ in tiles], [r for _, _, r in tiles]
