"""The host side of the unified attention kernel (no Triton needed): its tile table, and the launch
shape it takes from static sizes only — rows per tile, keys per loop trip, key chunks (split-KV).

The kernel in triton_unified.py runs one program per (tile, head); a tile is ``BLOCK_M``
consecutive query rows of *one* sequence. Before each step the host lists the tiles — which
sequence, which first row — in O(number of tiles); the kernel reads that list from the device.
Introduced in notebooks/12_flash_attention.ipynb.
"""

from __future__ import annotations

from ..errors import ConfigError


#: steps of at most this many tokens are mostly decodes: 16-row tiles; bigger steps, 64-row tiles
TILE_ROWS_DECODE_MAX = 256
#: steps of more than TILE_ROWS_DECODE_MAX and at most this many tokens (one or two long prompts)
#: walk the keys 128 a trip in one pipeline stage; bigger steps 64 a trip in two
FEW_PROMPTS_MAX_TOKENS = 2048


def tile_rows_for(num_tokens: int) -> int:
    """Query rows per tile, from the step's (bucket's) token count. Small steps are mostly decodes
    (one row per sequence): 16, the smallest ``tl.dot`` tile, wastes least. Bigger steps hold
    prompts: 64 rows. On an H200 (benchmarks/bench_attention.py's prefill sweep, session 11), one
    1,024-token prompt with GPT-2 XL's 25 heads took 21.1 us a layer in 64-row tiles with 128-key
    trips and one stage against 26.5 us in 128-row tiles (128-key trips, two stages: 255 registers
    a thread with a spill, two programs an SM); eight such prompts 114.3 us in 64-row tiles with
    64-key trips against 122.9 in 128-row ones."""
    return 16 if num_tokens <= TILE_ROWS_DECODE_MAX else 64


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


#: keys per loop trip of the split-KV path: a chunk is at least this long (a whole number of trips),
#: so short contexts use few splits and long ones all of them; SPLIT_BLOCK_N_FEW for steps of at most
#: FEW_TILES tiles (a few decodes), SPLIT_BLOCK_N for more
SPLIT_BLOCK_N = 64
SPLIT_BLOCK_N_FEW = 128
#: a step of at most this many tiles is "a few decodes": its programs walk 128 keys a trip. On an
#: H200 at context 576 (benchmarks/bench_attention.py, decode_sweep), per layer call: GPT-2 124M
#: batch 1 8.5 us with 64-key chunks → 5.9 us with 128, batch 8 11.2 → 9.7 us; GPT-2 XL batch 1
#: 8.4 → 7.2 us. With many tiles (GPT-2 XL batch 32, no split) 64-key trips win: 39.4 → 34.5 us
FEW_TILES = 8


def default_block_n(block_m: int, grid_tiles: int, num_splits: int, head_bytes: int, num_tokens: int) -> int:
    """Keys per loop trip: 128 for 16-row tiles (decode-sized steps) of at most :data:`FEW_TILES`
    tiles and for steps of at most :data:`FEW_PROMPTS_MAX_TOKENS` tokens (one or two long prompts:
    few programs, so fewer and longer trips), where K and V of heads up to 128 bytes keep shared
    memory small; else 64 (on the split path, the SPLIT_BLOCK_N constants). ``num_tokens``: the
    step's (bucket's) token count."""
    few_decodes = block_m == 16 and grid_tiles <= FEW_TILES
    if num_splits > 1:
        return SPLIT_BLOCK_N_FEW if few_decodes and head_bytes <= 128 else SPLIT_BLOCK_N
    few_prompts = block_m > 16 and num_tokens <= FEW_PROMPTS_MAX_TOKENS
    return 128 if (few_decodes or few_prompts) and head_bytes <= 128 else 64


def default_num_stages(block_m: int, block_n: int) -> int:
    """Pipeline stages of the key loop: one for the few-prompt shape (64 rows x 128 keys: 21.1 us
    against 23.9 with two for GPT-2 XL's 1,024-token prompt on an H200, where two stages of K and
    V tiles cost programs per SM), else two (loads one trip ahead)."""
    return 1 if block_m > 16 and block_n == 128 else 2


#: programs per SM the split-KV path aims for: enough resident programs to keep memory requests in flight
PROGRAMS_PER_SM = 4


def kv_splits_for(grid_tiles: int, num_heads: int, block_m: int, num_sms: int, max_splits: int,
                  max_keys: int | None = None, head_bytes: int = 128) -> int:
    """Key chunks per (tile, head) of the split-KV path (flash-decoding), from static sizes only.

    The plain kernel launches ``grid_tiles * num_heads`` programs; at batch 1 that is one per head
    (25 for GPT-2 XL on a 132-SM GPU) and most SMs idle. Split each tile's keys until the grid has
    about ``PROGRAMS_PER_SM * num_sms`` programs, at most ``max_splits``; 1 where the plain grid is
    already that big, and for prefill-sized steps (``block_m`` > 16, many 64-row tiles). The grid
    and ``block_m`` are fixed per CUDA-graph bucket, so the answer is too.

    ``max_keys``: the most keys a sequence can have (the model's context). A chunk is at least one
    key trip (:func:`default_block_n`, ``head_bytes`` per head), so a tile never has more than
    ``ceil(max_keys / trip)`` chunks that hold keys: more splits would only launch programs that
    exit at once (and lengthen the merge's loop over the chunks). GPT-2's 1,024 positions in
    128-key trips: at most 8. On an H200 at context 576, GPT-2 124M batch 1 (12 heads), one layer's
    call took 8.8 us with 32 splits and 7.3 us with 8 — the same five live chunks either way
    (benchmarks/bench_attention.py's decode sweep, results/2026-12-02_nvidia-h200_attention_decode_sweep.json).
    """
    for name, value in (("grid_tiles", grid_tiles), ("num_heads", num_heads), ("block_m", block_m),
                        ("num_sms", num_sms), ("max_splits", max_splits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"kv_splits_for: {name} must be a positive integer, got {value!r}")
    if max_splits == 1 or block_m > 16:
        return 1
    want = -(-PROGRAMS_PER_SM * num_sms // (grid_tiles * num_heads))
    splits = max(1, min(max_splits, want))
    if max_keys is not None and splits > 1:
        # a split step is decode-sized (16-row tiles): at most TILE_ROWS_DECODE_MAX tokens
        trip = default_block_n(block_m, grid_tiles, splits, head_bytes, TILE_ROWS_DECODE_MAX)
        splits = max(1, min(splits, -(-max_keys // trip)))
    return splits


def split_grid_bound(num_sms: int) -> int:
    """More (tile, head) programs than the grid of any step that :func:`kv_splits_for` splits: it
    splits a grid only when ``grid_tiles * num_heads < PROGRAMS_PER_SM * num_sms`` (else ``want``
    is 1). The size of split-KV's arrival counters (attention.TritonAttention)."""
    return PROGRAMS_PER_SM * num_sms
