"""``PrefixCache``: the keys and values of recently computed prompt prefixes, kept for the
next request that starts the same way.

Backend traffic sends the same system prompt or few-shot preamble with every call; each
request would compute the same keys and values again. Here a prompt's full blocks of
``BLOCK`` tokens are kept once computed, and a new request's prefill starts after its
longest cached prefix: its slot gets those blocks by copy (``restore``), the rest of its
prompt is computed as usual.

Why copies into the row's slot, and not rows reading shared blocks in place: attention here
reads each row's keys as a view of its contiguous slot (``kv_cache.py``); reading blocks
scattered in a pool means gathering them into one tensor per layer and step, which costs
more than the attention itself on a CPU (``benchmarks/kv_layout.py``), every step of the
row. A copy is paid once, at admission, and costs about as much as reading the prefix once
(figures in BENCHMARKS.md). The price is memory: a prefix lives in the pool and again in
every slot that uses it.

What is kept (``PrefixIndex``, no torch): a tree of blocks, each keyed by its parent and its
own tokens (so a block is found only after the same blocks before it: a hash chain as in
vLLM, but compared token by token, so no two prefixes can collide). A prompt's first block
is keyed by the request's ``cache_salt``: requests with different salts never share a block
(the empty salt is one group of its own). The pool has a fixed number of blocks
(``--prefix-cache-tokens``); when it is full the least recently used block that no running
row is about to read, and that no other block continues, goes first (a leaf: its parent
stays findable).

Exactness: a cached block holds the bits the row would compute itself, because a prompt
token's keys and values do not depend on how its prompt was chunked
(``engine/attention.py``'s tiles). At least the prompt's last two tokens are always computed
(``usable``): its last position's logits give the first token, and a one-token chunk would
run as a decoding row, not in the tiles.

Not thread-safe: the engine thread alone drives it; ``stats`` may be read from any thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING

import torch

from lmserve_server.engine.types import PrefixCacheStats

if TYPE_CHECKING:
    from lmserve_server.engine.kv_cache import KVCache, KVCacheShape

# Tokens per cached block: the granularity of reuse. Small enough that a prompt which
# diverges mid-way still finds most of its shared part; vLLM's default block is 16-32.
BLOCK = 32

# A block's key: its parent's id (the request's salt for a prompt's first block) and its
# own tokens.
_Key = tuple[int | str, tuple[int, ...]]


@dataclass(eq=False)
class CachedBlock:
    """One cached block of ``BLOCK`` prompt tokens: where its keys and values are in the
    pool (``slot``), and its place in the tree."""

    key: _Key
    id: int
    slot: int
    parent: CachedBlock | None
    children: int = 0
    pins: int = 0  # running rows about to read it (their restores)


class PrefixIndex:
    """Which blocks are cached, in which pool slots, and which one goes when room is
    needed. Pure bookkeeping: the tests drive it without a model."""

    def __init__(self, blocks: int) -> None:
        if blocks < 0:
            raise ValueError(f"a prefix cache of {blocks} blocks")
        self.capacity = blocks
        self._free = list(range(blocks - 1, -1, -1))  # pool slots, popped lowest first
        self._blocks: dict[_Key, CachedBlock] = {}
        # Least recently used first. A block always comes before its ancestors (``touch``
        # moves a chain deepest first), so the first unpinned block is a leaf.
        self._order: OrderedDict[CachedBlock, None] = OrderedDict()
        self._ids = count()
        self.evicted = 0  # blocks evicted so far

    def __len__(self) -> int:
        return len(self._blocks)

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

    def insert(
        self, salt: str, parent: CachedBlock | None, tokens: Sequence[int]
    ) -> tuple[CachedBlock, bool] | None:
        """The block of ``tokens`` after ``parent`` (None: a prompt's first block, keyed by
        ``salt``): (the block, whether it is new and needs its keys and values written).
        None when the pool is full of blocks that can't be evicted."""
        key: _Key = (salt if parent is None else parent.id, tuple(tokens))
        block = self._blocks.get(key)
        if block is not None:
            return block, False
        if not self._free and not self._evict_one():
            return None
        block = CachedBlock(key, next(self._ids), self._free.pop(), parent)
        self._blocks[key] = block
        self._order[block] = None
        if parent is not None:
            parent.children += 1
        return block, True

    def _evict_one(self) -> bool:
        """Frees the least recently used block that is unpinned and has no children."""
        for block in self._order:
            if block.pins == 0 and block.children == 0:
                break
        else:
            return False
        del self._order[block]
        del self._blocks[block.key]
        if block.parent is not None:
            block.parent.children -= 1
        self._free.append(block.slot)
        self.evicted += 1
        return True


class PrefixCache:
    """The pool of cached blocks (per layer keys and values ``(blocks, kv_heads, BLOCK,
    head_dim)``, allocated once) and its index; copies blocks between the pool and a
    ``KVCache``'s slots."""

    def __init__(self, shape: KVCacheShape, *, tokens: int, device: torch.device) -> None:
        blocks = tokens // BLOCK
        self.index = PrefixIndex(blocks)
        size = (blocks, shape.kv_heads, BLOCK, shape.head_dim)
        self.keys = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.values = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.device = device
        self.queries = 0  # prompt tokens looked up at admission
        self.hits = 0  # of those, tokens taken from the cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

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
        in the prefill's tiles; the two are computed again over the copied blocks, the same
        bits)."""
        chain = self.index.match(salt, prompt, len(prompt) // BLOCK)
        return chain, min(len(chain) * BLOCK, max(len(prompt) - 2, 0))

    def reset_counts(self) -> None:
        self.queries = self.hits = 0

    def count(self, prompt_tokens: int, cached: int) -> None:
        """A request was admitted with ``cached`` of its ``prompt_tokens`` from the cache."""
        self.queries += prompt_tokens
        self.hits += cached

    def restore(self, cache: KVCache, slot: int, chain: Sequence[CachedBlock]) -> None:
        """Copies ``chain``'s keys and values into positions ``[0, len(chain) * BLOCK)`` of
        ``slot``."""
        if not chain:
            return
        n = len(chain)
        ids = torch.tensor([b.slot for b in chain], dtype=torch.long).to(self.device)
        for pool, kv in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, blocks in enumerate(pool):
                heads, _, head_dim = kv[layer].shape[1:]
                row = kv[layer][slot, :, : n * BLOCK].view(heads, n, BLOCK, head_dim)
                row.copy_(blocks.index_select(0, ids).transpose(0, 1))

    def store(
        self,
        cache: KVCache,
        slot: int,
        salt: str,
        prompt: Sequence[int],
        chain: list[CachedBlock],
        computed: int,
    ) -> None:
        """Keeps the full blocks of ``prompt[:computed]`` (in ``slot``'s positions) past
        ``chain``, the row's blocks kept so far, which grows with them. A block another row
        kept meanwhile is shared, not copied again; when the pool is full of blocks in use,
        the rest are not kept. Blocks of ``chain`` evicted since (another row's keeping
        needed the room) are dropped from it first: only leaves go, so they are its tail,
        and the row keeps them again from its slot."""
        while chain and not self.index.holds(chain[-1]):
            chain.pop()
        self.index.pin(chain)  # its own chain is never what makes room for its next block
        fresh: list[tuple[int, int]] = []  # (block of the prompt, pool slot) to copy
        try:
            for i in range(len(chain), computed // BLOCK):
                parent = chain[-1] if chain else None
                placed = self.index.insert(salt, parent, prompt[i * BLOCK : (i + 1) * BLOCK])
                if placed is None:
                    break
                block, new = placed
                block.pins += 1
                chain.append(block)
                if new:
                    fresh.append((i, block.slot))
        finally:
            self.index.unpin(chain)
        self.index.touch(chain)
        if fresh:
            self._copy_out(cache, slot, fresh)

    def _copy_out(self, cache: KVCache, slot: int, fresh: Sequence[tuple[int, int]]) -> None:
        """Copies blocks of ``slot`` into the pool: (block of the prompt, pool slot)."""
        first, last = fresh[0][0], fresh[-1][0]
        # The prompt's blocks come in order, new ones after any shared: one run.
        assert [i for i, _ in fresh] == list(range(first, last + 1))
        n = len(fresh)
        ids = torch.tensor([s for _, s in fresh], dtype=torch.long).to(self.device)
        span = slice(first * BLOCK, (last + 1) * BLOCK)
        for pool, kv in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, blocks in enumerate(pool):
                heads, _, head_dim = kv[layer].shape[1:]
                row = kv[layer][slot, :, span].view(heads, n, BLOCK, head_dim)
                blocks.index_copy_(0, ids, row.transpose(0, 1))
