"""The block manager: which KV blocks of the paged pool belong to which sequence.

The KV cache is cut into fixed-size blocks of ``block_size`` token slots. A sequence's
``block_table`` lists its blocks in order, so token ``t`` lives in slot
``block_table[t // block_size] * block_size + t % block_size``. Blocks are handed out from a free list and given back when a request finishes or is preempted; nothing is ever
copied or compacted.

Prefix caching: once a block is *full*, it is named by a hash of its tokens and of the hash
of the block before it (so the name stands for the whole prefix up to that block). A new
request whose first full blocks hash to names already in the table reuses those blocks, with a
reference count, instead of computing them again. Freed blocks keep their name until the
free list hands them out again, oldest first, so a prompt that comes back soon still hits.

Naming waits for the step's launch: ``allocate`` only notes which blocks will be full, and
``name_pending`` (the engine calls it once the step's forward is issued, so on a GPU it runs
beside the device) names them. A lookup never misses a name because of it: a later request of
the same step can hit an earlier one's blocks only if their first blocks hold the same tokens,
and then ``find_cached_prefix`` names the waiting blocks first.

Block 0 is the *null block*: it is never given out; padded rows of a CUDA-graph batch write
their throw-away K/V there. Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

from .sequence import Sequence

NULL_BLOCK = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None       # set once the block is full (prefix caching)
    token_ids: tuple[int, ...] = ()     # the tokens it holds when hashed, to rule out collisions


def hash_block(parent_hash: int | None, token_ids) -> int:
    """Name of a full block: its tokens together with the name of the prefix before it."""
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    """Hands out KV blocks; counts references; finds cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks          # usable blocks, ids 1..num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks + 1)]   # + the null block 0
        # free blocks in eviction order: the front is handed out first
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks + 1))
        self.cached: dict[int, int] = {}      # block hash -> block id
        self.num_queried_tokens = 0           # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0               # of those, found there
        self.named_this_step: list[int] = []  # blocks named since begin_step(): their K/V are not written yet
        # blocks to name once the step is issued: id(seq) -> (seq, tokens with K/V after the step)
        self.pending: dict[int, tuple[Sequence, int]] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks equal to the sequence's first full blocks.

        At least one token is left uncomputed: its logits are needed to pick the next token.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        full = (seq.num_tokens - 1) // bs
        first = seq.token_ids[:bs]
        if full and any(other.token_ids[:bs] == first for other, _ in self.pending.values()):
            self.name_pending()                   # it may share blocks allocated earlier in this step
        hits, h = [], None
        for b, tokens in enumerate(zip(*[iter(seq.token_ids[:full * bs])] * bs)):
            h = hash_block(h, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def _note_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """``seq`` will hold K/V for ``num_tokens`` tokens once the step runs: its full blocks get
        their names at :meth:`name_pending`."""
        bs = self.block_size
        if min(num_tokens, seq.num_tokens) // bs <= len(seq.block_hashes):
            return                                 # no block fills up
        _, before = self.pending.get(id(seq), (seq, 0))
        self.pending[id(seq)] = (seq, max(num_tokens, before))

    def name_pending(self) -> None:
        """Name the blocks that this step's allocations filled (see the module docstring)."""
        for seq, num_tokens in self.pending.values():
            self._cache_full_blocks(seq, num_tokens)
        self.pending.clear()

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name every block of ``seq`` that is full once ``num_tokens`` tokens have K/V and whose
        tokens the host knows (a token still in flight on the device names its block at a later
        step's allocation, once it is known)."""
        bs = self.block_size
        first, last = len(seq.block_hashes), min(num_tokens, seq.num_tokens) // bs
        h = seq.block_hashes[-1] if seq.block_hashes else None
        blocks, cached, named, hashes = self.blocks, self.cached, self.named_this_step, seq.block_hashes
        # the blocks' tokens as tuples of bs, cut in one pass (zip over one iterator, bs times)
        for block_id, tokens in zip(seq.block_table[first:last], zip(*[iter(seq.token_ids[first * bs:last * bs])] * bs)):
            h = hash_block(h, tokens)
            hashes.append(h)
            block = blocks[block_id]
            if block.block_hash is None:
                block.block_hash, block.token_ids = h, tokens
                cached.setdefault(h, block_id)
                named.append(block_id)

    # ------------------------------------------------------------------ allocate / free
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Give ``seq`` the blocks for ``num_new_tokens`` more tokens; False (and no change)
        when the pool has too few free blocks.

        ``cached_block_ids`` (first scheduling only) are prefix-cache hits taken over as the
        sequence's first blocks. The blocks that will be full after this step are hashed now:
        within a step every layer writes all new K/V before any attention reads it, so a later
        request of the same step may already reuse them.
        """
        num_tokens = seq.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        new_blocks = self.blocks_needed(num_tokens) - len(seq.block_table) - len(cached_block_ids)
        if new_blocks <= 0 and not cached_block_ids:     # most decode steps: the last block has room
            if self.enable_prefix_caching:
                self._note_full_blocks(seq, num_tokens)
            return True
        revived = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        if max(new_blocks, 0) + revived > len(self.free):
            return False
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if new_blocks > 0:
            free, blocks, cached = self.free, self.blocks, self.cached
            taken = list(islice(free, new_blocks))    # the front of the free list, oldest first
            for block_id in taken:
                del free[block_id]
                block = blocks[block_id]
                if block.block_hash is not None:      # evict its old name
                    if cached.get(block.block_hash) == block_id:
                        del cached[block.block_hash]
                    block.block_hash, block.token_ids = None, ()
                block.ref_count = 1
            seq.block_table += taken
        if self.enable_prefix_caching:
            self._note_full_blocks(seq, num_tokens)
        return True

    def begin_step(self) -> None:
        self.name_pending()                           # left from steps run by hand (the engine names at launch)
        self.named_this_step = []

    def forget_step_names(self) -> None:
        """A step failed before its K/V were all written: the blocks it named hold no valid K/V,
        so no later prompt may find them."""
        self.pending.clear()                          # never named
        for block_id in self.named_this_step:
            block = self.blocks[block_id]
            if block.block_hash is not None and self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        self.named_this_step = []

    def free_sequence(self, seq: Sequence) -> None:
        """Give back the sequence's blocks. Named blocks stay findable until reused; blocks waiting
        for a name (:meth:`name_pending`) get none."""
        self.pending.pop(id(seq), None)
        for block_id in reversed(seq.block_table):    # the tail is evicted before the head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.block_hash is None:          # nothing to keep: hand out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
