"""``PrefixCache``: the KV cache's blocks of recently computed prompt prefixes, kept findable
for the next request that starts the same way.

Backend traffic sends the same system prompt or few-shot preamble with every call; each
request would compute the same keys and values again. Here a prompt's full blocks of
``BLOCK`` tokens stay findable once computed, and a new request's prefill starts after its
longest cached prefix: those blocks go into its block table as they are, shared in place
with every other row that starts the same way (no copy, no second pool: ``block_pool.py``
counts the tables that hold a block). The rest of its prompt is computed as usual.

What is kept (``PrefixIndex``, no torch): a tree of blocks, each keyed by its parent and its
own tokens (so a block is found only after the same blocks before it: a hash chain as in
vLLM, but compared token by token, so no two prefixes can collide). A prompt's first block
is keyed by the request's ``cache_salt``: requests with different salts never share a block
(the empty salt is one group of its own). A cached block that no row holds is *idle*: it
stays findable until the pool needs its room, or until the index is full
(``--prefix-cache-tokens``); then the least recently used idle block that no other block
continues goes first (a leaf: its parent stays findable).

A row keeps the blocks of its prompt that it computed itself, as one chain after the blocks
it found, so every block in a row's table that is cached has its whole chain in that table
too: an idle block's descendants are idle, and every idle block can be evicted in turn.

Exactness: a cached block holds the bits the row would compute itself, because a prompt
token's keys and values do not depend on how its prompt was chunked
(``engine/attention.py``'s tiles). At least the prompt's last two tokens are always computed
(``usable``): its last position's logits give the first token, and a one-token chunk would
run as a decoding row, not in the tiles. When those two fall in a shared block, the row
writes there the bits the block already holds.

Not thread-safe: the engine thread alone drives it; ``stats`` may be read from any thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING

from lmserve_server.engine.types import PrefixCacheStats

if TYPE_CHECKING:
    from lmserve_server.engine.block_pool import BlockPool

# Tokens per block of the KV cache: the granularity of reuse. Small enough that a prompt
# which diverges mid-way still finds most of its shared part; vLLM's default block is 16-32.
BLOCK = 32

# A block's key: its parent's id (the request's salt for a prompt's first block) and its
# own tokens.
_Key = tuple[int | str, tuple[int, ...]]


@dataclass(eq=False)
class CachedBlock:
    """One cached block of ``BLOCK`` prompt tokens: which block of the pool holds its keys
    and values (``slot``), and its place in the tree."""

    key: _Key
    id: int
    slot: int
    parent: CachedBlock | None
    children: int = 0
    pins: int = 0  # kept from eviction by a caller while it works on the chain


class PrefixIndex:
    """Which pool blocks are cached under which tokens, and which one goes when room is
    needed. Pure bookkeeping: the tests drive it without a model. Without a ``pool``
    every block counts as idle (no row holds it)."""

    def __init__(self, blocks: int, pool: BlockPool | None = None) -> None:
        if blocks < 0:
            raise ValueError(f"a prefix cache of {blocks} blocks")
        self.capacity = blocks
        self._pool = pool
        self._blocks: dict[_Key, CachedBlock] = {}
        self._by_slot: dict[int, CachedBlock] = {}
        # Least recently used first. A block always comes before its ancestors (``touch``
        # moves a chain deepest first), so the first evictable block is a leaf.
        self._order: OrderedDict[CachedBlock, None] = OrderedDict()
        self._ids = count()
        self.evicted = 0  # blocks evicted so far
        self.idle = 0  # cached blocks no row holds (the pool keeps this count)
        if pool is not None:
            pool.cached = self

    def __len__(self) -> int:
        return len(self._blocks)

    def caches(self, slot: int) -> bool:
        return slot in self._by_slot

    def match(self, salt: str, tokens: Sequence[int], most: int) -> list[CachedBlock]:
        """The cached chain of ``tokens``' first full blocks, at most ``most`` of them."""
        chain: list[CachedBlock] = []
        parent: int | str = salt
        for i in range(min(most, len(tokens) // BLOCK)):
            block = self._blocks.get((parent, tuple(tokens[i * BLOCK : (i + 1) * BLOCK])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def holds(self, block: CachedBlock) -> bool:
        """``block`` is still cached (not evicted)."""
        return self._blocks.get(block.key) is block

    def touch(self, chain: Sequence[CachedBlock]) -> None:
        """``chain`` (a prefix, root first) was used now."""
        for block in reversed(chain):
            self._order.move_to_end(block)

    def pin(self, chain: Sequence[CachedBlock]) -> None:
        """No block of ``chain`` is evicted until ``unpin``."""
        for block in chain:
            block.pins += 1

    def unpin(self, chain: Sequence[CachedBlock]) -> None:
        for block in chain:
            block.pins -= 1

    def find(
        self, salt: str, parent: CachedBlock | None, tokens: Sequence[int]
    ) -> CachedBlock | None:
        """The cached block of ``tokens`` after ``parent``, if any."""
        return self._blocks.get((salt if parent is None else parent.id, tuple(tokens)))

    def insert(
        self, salt: str, parent: CachedBlock | None, tokens: Sequence[int], slot: int
    ) -> tuple[CachedBlock, bool] | None:
        """Caches pool block ``slot`` as the block of ``tokens`` after ``parent`` (None: a
        prompt's first block, keyed by ``salt``): (the block, True); (the block already
        cached under that key, False); None when the index is full of blocks that can't be
        evicted."""
        key: _Key = (salt if parent is None else parent.id, tuple(tokens))
        block = self._blocks.get(key)
        if block is not None:
            return block, False
        if len(self._blocks) >= self.capacity and self._evict_one() is None:
            return None
        block = CachedBlock(key, next(self._ids), slot, parent)
        self._blocks[key] = block
        self._by_slot[slot] = block
        self._order[block] = None
        if parent is not None:
            parent.children += 1
        if self._idle(block):
            self.idle += 1
        return block, True

    def evict_idle(self) -> int | None:
        """Evicts the least recently used idle leaf and gives its block back to the pool;
        returns that block (None when no block is idle)."""
        return self._evict_one()

    def _idle(self, block: CachedBlock) -> bool:
        return self._pool is None or self._pool.refs[block.slot] == 0

    def _evict_one(self) -> int | None:
        """Forgets the least recently used block that is unpinned, idle, and has no
        children; an idle one's pool block is free again."""
        for block in self._order:
            if block.pins == 0 and block.children == 0 and self._idle(block):
                break
        else:
            return None
        del self._order[block]
        del self._blocks[block.key]
        del self._by_slot[block.slot]
        if block.parent is not None:
            block.parent.children -= 1
        self.idle -= 1
        if self._pool is not None:
            self._pool.give_back(block.slot)
        self.evicted += 1
        return block.slot


class PrefixCache:
    """The index over the KV cache's pool, and its counters."""

    def __init__(self, pool: BlockPool, *, tokens: int) -> None:
        self.index = PrefixIndex(tokens // BLOCK, pool)
        self.queries = 0  # prompt tokens looked up at admission
        self.hits = 0  # of those, tokens taken from the cache

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            queries=self.queries,
            hits=self.hits,
            tokens=len(self.index) * BLOCK,
            capacity_tokens=self.index.capacity * BLOCK,
            evicted_tokens=self.index.evicted * BLOCK,
        )

    def usable(self, salt: str, prompt: Sequence[int]) -> tuple[list[CachedBlock], int]:
        """The cached blocks a request with ``prompt`` starts from (its longest cached
        prefix of full blocks), and how many of its tokens it need not compute: all of
        theirs but the prompt's last two (a one-token rest would run as a decoding row, not
        in the prefill's tiles; the two are computed again, the same bits)."""
        chain = self.index.match(salt, prompt, len(prompt) // BLOCK)
        return chain, min(len(chain) * BLOCK, max(len(prompt) - 2, 0))

    def reset_counts(self) -> None:
        self.queries = self.hits = 0

    def count(self, prompt_tokens: int, cached: int) -> None:
        """A request was admitted with ``cached`` of its ``prompt_tokens`` from the cache."""
        self.queries += prompt_tokens
        self.hits += cached

    def store(
        self,
        table: Sequence[int],
        salt: str,
        prompt: Sequence[int],
        chain: list[CachedBlock],
        computed: int,
    ) -> None:
        """Caches the full blocks of ``prompt[:computed]`` past ``chain`` (the row's cached
        blocks so far, which grows with them), each the pool block of the row's ``table``
        at its place. Stops at a block cached already by another row (that row computed the
        same tokens meanwhile: this row's copy stays its own, and so do the blocks after
        it, which keeps a row's cached blocks one chain in its table) or when the index is
        full of blocks in use."""
        for i in range(len(chain), computed // BLOCK):
            parent = chain[-1] if chain else None
            tokens = prompt[i * BLOCK : (i + 1) * BLOCK]
            if self.index.find(salt, parent, tokens) is not None:
                break
            self.index.pin(chain)  # its own chain never makes room for its next block
            try:
                placed = self.index.insert(salt, parent, tokens, table[i])
            finally:
                self.index.unpin(chain)
            if placed is None:
                break
            chain.append(placed[0])
        self.index.touch(chain)
