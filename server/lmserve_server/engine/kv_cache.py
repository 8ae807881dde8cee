"""``KVCache``: the continuous engine's keys and values, one pool of blocks for every row.

Every layer owns two buffers::

    keys, values: (kv_heads, blocks + 1, BLOCK, head_dim)

A running row holds a block table (``block_pool.py``): the block of its positions
``[32 i, 32 i + 32)`` is its table's entry i, taken when its prompt is admitted or when its
decoding reaches a new block, given back when it ends. So a row takes memory as its tokens
need it, not a reserved slot of the longest request: ``--max-batch-size`` bounds the rows
running together and ``--kv-cache-tokens`` (the pool) what they hold all together; one
request may use the model's whole context when the pool has room. A cached prompt prefix is
blocks of the same pool, in several rows' tables at once (``prefix_cache.py``). The extra
last block is scratch: the rows that pad a step to a fixed shape write there and nobody
reads it. Blocks are zeroed once (attention reads whole blocks past a row's last token,
masked: a masked column must still hold a finite number, weight 0 x NaN = NaN).

Attention gathers the blocks a step reads (``engine/attention.py``); heads first, so the
gather of a row's blocks is one contiguous run per head that reads as that row's keys with
no further copy.

Beside the blocks, ``slots`` rows of per-row sampling state (``sampling_slots.py``): a
running row also holds one of those, taken at admission.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from lmserve_server.engine.block_pool import BlockPool
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
    """The pool's buffers and bookkeeping, and the rows' sampling slots. Not thread-safe:
    the engine thread alone drives it."""

    def __init__(
        self,
        shape: KVCacheShape,
        *,
        slots: int,
        tokens: int,
        device: torch.device,
        row_tokens: int | None = None,
        prefix_tokens: int = 0,
    ) -> None:
        blocks = tokens // BLOCK
        if slots < 1 or blocks < 1:
            raise ValueError(
                f"a KV cache needs rows >= 1 and at least {BLOCK} tokens, got {slots} rows "
                f"and {tokens} tokens"
            )
        self.shape = shape
        self.slots = slots
        self.scratch_slot = slots
        self.blocks = blocks
        self.scratch_block = blocks
        # The longest row (prompt + new tokens): the model's context, at most the pool.
        self.row_tokens = min(row_tokens or blocks * BLOCK, blocks * BLOCK)
        self.device = device
        size = (shape.kv_heads, blocks + 1, BLOCK, shape.head_dim)
        self.keys = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.values = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.pool = BlockPool(blocks)
        self._free = list(range(slots))  # a heap: the lowest free slot first
        # Cached prompt blocks, when at least one block's worth of tokens is given.
        self.prefixes = (
            PrefixCache(self.pool, tokens=min(prefix_tokens, blocks * BLOCK))
            if prefix_tokens >= BLOCK
            else None
        )

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def allocate(self) -> int | None:
        """The lowest free slot, now taken; None when every slot is taken."""
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        """Gives ``slot`` back."""
        if not 0 <= slot < self.slots or slot in self._free:
            raise ValueError(f"slot {slot} is not taken")
        heapq.heappush(self._free, slot)


def blocks_for(tokens: int) -> int:
    """The blocks that hold ``tokens`` positions."""
    return -(-tokens // BLOCK)


def plan_capacity(
    shape: KVCacheShape,
    *,
    rows: int,
    context: int,
    tokens: int = 0,
    free_bytes: int | None = None,
    memory_fraction: float = 0.0,
) -> int:
    """The pool's size in tokens for ``rows`` concurrent rows of a model with ``context``
    tokens: ``tokens`` (``--kv-cache-tokens``) when given, else every row a whole context
    at most ``memory_fraction`` of ``free_bytes`` (on a GPU its free memory, on a CPU the
    host's memory)."""
    if tokens <= 0:
        tokens = rows * context
        if free_bytes is not None and memory_fraction > 0:
            tokens = min(tokens, int(free_bytes * memory_fraction) // shape.bytes_per_token)
    tokens -= tokens % BLOCK
    if tokens < BLOCK:
        raise ValueError(
            f"a KV cache of {tokens} tokens holds no block of {BLOCK} (raise --kv-cache-tokens)"
        )
    return tokens
