"""``BlockPool``: which blocks of the KV cache are free, which rows hold which, and which
cached prompt blocks may be taken back when room is needed. Bookkeeping only (no torch).

The KV cache is one pool of fixed blocks of ``BLOCK`` tokens shared by every row
(``kv_cache.py``). A row holds a block table, the blocks of its positions in order, and takes
blocks as it grows; a block may be in several rows' tables at once (a cached prompt prefix,
``prefix_cache.py``), so each block counts the tables that hold it (``refs``). A block
whose count falls to 0 is free again, unless the prefix cache keeps it: then it stays
findable, *idle*, until the pool needs room and evicts it (least recently used first, as
vLLM's free queue does with its cached blocks).

Free blocks are handed out lowest first (a heap), so a lightly loaded server touches few
pages of the pool.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Protocol

from lmserve_server.engine.types import KVCacheBlocks


class IdleBlocks(Protocol):
    """What the pool needs of the prefix cache's index: how many cached blocks no row
    holds, whether a block is cached, and the eviction of one idle block."""

    idle: int

    def caches(self, block: int) -> bool: ...

    def evict_idle(self) -> int | None: ...


class BlockPool:
    """``blocks`` blocks, numbered from 0. Not thread-safe: the engine thread alone."""

    def __init__(self, blocks: int) -> None:
        if blocks < 1:
            raise ValueError(f"a KV cache of {blocks} blocks")
        self.blocks = blocks
        self.refs = [0] * blocks
        self._free = list(range(blocks))  # a heap: lowest first
        self.cached: IdleBlocks | None = None
        self.preempted = 0  # rows that gave their blocks back before ending, to let others on

    @property
    def free(self) -> int:
        """Blocks neither held nor cached."""
        return len(self._free)

    @property
    def available(self) -> int:
        """Blocks a row may take now: the free ones and the idle cached ones."""
        return len(self._free) + (self.cached.idle if self.cached is not None else 0)

    @property
    def held(self) -> int:
        """Blocks in at least one row's table."""
        return self.blocks - self.available

    def counts(self) -> KVCacheBlocks:
        """Its counts now (plain integers: read from any thread)."""
        return KVCacheBlocks(self.blocks, self.held, self.available, self.preempted)

    def take(self, n: int) -> list[int] | None:
        """``n`` blocks, each now held once; idle cached blocks are evicted for them once
        the free ones run out. None (and nothing taken) when fewer are available."""
        if n > self.available:
            return None
        taken = []
        for _ in range(n):
            if not self._free:
                assert self.cached is not None
                evicted = self.cached.evict_idle()
                assert evicted is not None, "an idle block is always evictable"
            block = heapq.heappop(self._free)
            self.refs[block] = 1
            taken.append(block)
        return taken

    def share(self, blocks: Iterable[int]) -> None:
        """One more table holds each of ``blocks`` (cached blocks found for a new row)."""
        for block in blocks:
            if self.refs[block] == 0:
                assert self.cached is not None and self.cached.caches(block)
                self.cached.idle -= 1
            self.refs[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One table fewer holds each of ``blocks``; a block no table holds goes back to
        the free heap, or stays cached as idle."""
        for block in blocks:
            if self.refs[block] <= 0:
                raise ValueError(f"block {block} is not held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.cached is not None and self.cached.caches(block):
                    self.cached.idle += 1
                else:
                    heapq.heappush(self._free, block)

    def give_back(self, block: int) -> None:
        """An evicted cached block that no table holds: free again."""
        assert self.refs[block] == 0
        heapq.heappush(self._free, block)
