"""``KVCache``: the continuous engine's keys and values, allocated once, addressed per row.

Every layer owns two buffers::

    keys, values: (slots + 1, kv_heads, slot_tokens, head_dim)

A running row holds one slot from admission to its end and writes each token's key and value
at (its slot, the token's position): no shared write column, nothing moves, nothing grows,
and a row that ends frees its slot with no copy (``free``; slots come from a free list,
lowest first, so running rows stay packed at the low end). The extra last slot is scratch:
the rows that pad a step to a fixed shape write there and nobody reads it.

Why slots and not vLLM's paged blocks: attention over a row's contiguous slot is a strided
view of the buffer that SDPA reads in place; attention over pages needs the pages gathered
into one tensor per layer and step first, and without a paged-attention kernel that copy
costs more than the attention itself (``benchmarks/kv_layout.py``: figures in
BENCHMARKS.md). The price is that a row reserves ``slot_tokens`` whatever its length, so the
capacity is counted in rows of ``slot_tokens``; ``--kv-cache-tokens`` sets it.

Beside the slots, an optional pool of cached prompt blocks (``prefixes``,
``prefix_cache.py``): a new row's slot gets its cached prefix by copy from there.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from lmserve_server.engine.prefix_cache import BLOCK, PrefixCache


@dataclass(frozen=True)
class KVCacheShape:
    """What one token's keys and values take in every layer of a model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config: object, dtype: torch.dtype) -> KVCacheShape:
        """The shape a transformers config implies (``num_key_value_heads`` when grouped)."""
        text = config.get_text_config()  # type: ignore[attr-defined]
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(int(text.num_hidden_layers), kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element


class KVCache:
    """The buffers and the free list of their slots. Not thread-safe: the engine thread
    alone drives it."""

    def __init__(
        self,
        shape: KVCacheShape,
        *,
        slots: int,
        slot_tokens: int,
        device: torch.device,
        prefix_tokens: int = 0,
    ) -> None:
        if slots < 1 or slot_tokens < 1:
            raise ValueError(f"a KV cache needs slots >= 1 and slot_tokens >= 1, got {slots}")
        self.shape = shape
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.scratch_slot = slots
        self.device = device
        size = (slots + 1, shape.kv_heads, slot_tokens, shape.head_dim)
        # Zeros, not uninitialised memory: attention reads a window wider than a short row,
        # and a masked column must still hold a finite number (weight 0 x NaN = NaN).
        self.keys = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.values = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self._free = list(range(slots))  # a heap: the lowest free slot first
        # Cached prompt blocks, when at least one block's worth of tokens is given.
        self.prefixes = (
            PrefixCache(shape, tokens=prefix_tokens, device=device)
            if prefix_tokens >= BLOCK
            else None
        )

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def occupancy(self) -> float:
        """The share of the slots that rows hold now (``lmserve_kv_cache_usage``); a plain
        read of the free list's length, so any thread may ask."""
        return 1.0 - len(self._free) / self.slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def allocate(self) -> int | None:
        """The lowest free slot, now taken; None when every slot is taken."""
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        """Gives ``slot`` back; its stale contents are overwritten by its next row."""
        if not 0 <= slot < self.slots or slot in self._free:
            raise ValueError(f"slot {slot} is not taken")
        heapq.heappush(self._free, slot)


def plan_capacity(
    shape: KVCacheShape,
    *,
    rows: int,
    context: int,
    tokens: int = 0,
    free_bytes: int | None = None,
    memory_fraction: float = 0.0,
) -> tuple[int, int]:
    """(slots, slot_tokens) for ``rows`` concurrent rows of a model with ``context`` tokens.

    ``tokens`` (``--kv-cache-tokens``) sets the total; 0 means every row may use the whole
    context, limited on a GPU to ``memory_fraction`` of ``free_bytes``. A row holds one slot;
    the longest request accepted is ``slot_tokens`` (prompt + max_new_tokens).
    """
    if tokens <= 0:
        tokens = rows * context
        if free_bytes is not None and memory_fraction > 0:
            tokens = min(tokens, int(free_bytes * memory_fraction) // shape.bytes_per_token)
    slot_tokens = min(context, tokens // rows)
    if slot_tokens < 1:
        raise ValueError(
            f"a KV cache of {tokens} tokens can't give {rows} rows a slot each "
            "(raise --kv-cache-tokens or lower --max-batch-size)"
        )
    return rows, slot_tokens
