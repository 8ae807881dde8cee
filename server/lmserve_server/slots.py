"""``SlotCache``: the running batch's KV cache, preallocated and written in place, and the
attention that reads it.

A ``DynamicCache`` grows by ``torch.cat`` on every decode step, so each step copies the
whole cache, and a row joining a running batch copies it again (padding, then concatenating).
On this CPU those copies cost as much as the model itself. Here every layer owns two buffers

    keys, values: (slots, kv_heads, capacity, head_dim)

and every row sits in a slot (rows ``0..B-1``; a leaving row's slot is filled by the last
row). All rows share one write column ``end``: a step writes each running row's new key and
value at ``end`` and attends over the window ``[start, end]``, a view of the buffers, never
a copy. A row's own tokens are ``[row_start, end]``; columns left of its start (another row's
longer past, or stale data from the slot's previous row) are masked out. ``start`` is the
oldest running row's first column, so the window shrinks as long rows leave.

One forward serves the whole step, packed as one sequence with no padding:

    tokens: [running rows' last tokens (B) | joiner 1's prompt (p1) | joiner 2's ... ]

Projections and MLPs don't care which row a token belongs to; only attention does, and
``slot_attention`` (registered with transformers' ``AttentionInterface``) gives each part
its own: a running row attends over its window, a joiner causally over its own prompt,
written into a free slot so that it too ends at column ``end``. So joining costs no separate
prefill pass over the weights, and the prompt is never padded.

Copies happen only when they must: a leaving row's slot takes the last row's, and when
``end`` reaches the capacity the window moves back to column 0 (or the buffers double when
the window would fill three quarters of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "lmserve_slots"


@dataclass
class SlotStep:
    """Where one packed forward's tokens go: ``decoding`` running rows first (one token
    each, slots ``0..decoding-1``), then each joiner's prompt as (slot, offset, length)."""

    cache: SlotCache
    decoding: int
    joins: list[tuple[int, int, int]]
    start: int  # the running rows' window: columns [start, end]
    end: int
    mask: torch.Tensor  # (decoding, 1, 1, end - start + 1): True where a row may attend

    def write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        """Puts the step's keys or values, (1, H, S, D), into their slots' columns."""
        if self.decoding:
            buffer[: self.decoding, :, self.end] = new[0, :, : self.decoding].transpose(0, 1)
        for slot, offset, length in self.joins:
            columns = slice(self.end + 1 - length, self.end + 1)
            buffer[slot, :, columns] = new[0, :, offset : offset + length]

    def attend(self, layer: int, query: torch.Tensor, scale: float | None) -> torch.Tensor:
        """(1, H, S, D) queries -> (1, S, H, D) outputs, each part over its own keys."""
        keys, values = self.cache.buffers(layer)
        out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
        if self.decoding:
            q = query[0, :, : self.decoding].transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
            window = slice(self.start, self.end + 1)
            k, v = keys[: self.decoding, :, window], values[: self.decoding, :, window]
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=self.mask, scale=scale
            )  # (B, H, 1, D)
            out[0, : self.decoding] = o[:, :, 0]
        for slot, offset, length in self.joins:
            q = query[:, :, offset : offset + length]  # (1, H, p, D)
            columns = slice(self.end + 1 - length, self.end + 1)
            k, v = keys[slot : slot + 1, :, columns], values[slot : slot + 1, :, columns]
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale
            )  # (1, H, p, D)
            out[0, offset : offset + length] = o[0].transpose(0, 1)
        return out


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    slot_step: SlotStep | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention of a packed slot step; plain SDPA for any other forward (``generate``
    of the static engine runs through here too once the model uses this attention)."""
    if slot_step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return slot_step.attend(int(module.layer_idx), query, scaling), None  # type: ignore[arg-type]


def use_slot_attention(model: Any) -> None:
    """Switches an SDPA model to ``slot_attention`` (the same SDPA outside slot steps)."""
    current = model.config._attn_implementation
    if current == ATTENTION:
        return
    if current != "sdpa":
        raise ValueError(f"--scheduler continuous needs sdpa attention, not {current!r}")
    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; ``update`` writes the step's keys and values into their slots."""

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a SlotCache allocates its buffers in begin_step")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._cache.current
        assert step is not None and self.keys is not None and self.values is not None
        step.write(self.keys, key_states)
        step.write(self.values, value_states)
        return key_states, value_states  # slot_attention reads the buffers, not these

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.window + query_length, 0

    def get_seq_length(self) -> int:
        return self._cache.window

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The running batch's cache: ``begin_step`` places a step's tokens (making room),
    ``end_step`` moves past its column, ``remove`` frees slots. Not thread-safe: the decode
    thread alone drives it."""

    def __init__(
        self,
        *,
        layers: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int = 0,
    ) -> None:
        self._slot_layers = [_SlotLayer(self) for _ in range(layers)]
        super().__init__(layers=list(self._slot_layers))
        self._shape = (heads, head_dim)
        self._dtype = dtype
        self.device = device
        self.max_slots = max_slots  # a hint: slots double up to it (0: only as needed)
        self.rows = 0  # running rows, in slots 0..rows-1
        self.start = 0  # the window's first column
        self.end = 0  # the column the next step writes
        self.row_start = torch.zeros((0,), dtype=torch.long, device=device)  # (B,)
        self.current: SlotStep | None = None

    @property
    def slots(self) -> int:
        keys = self._slot_layers[0].keys
        return 0 if keys is None else keys.shape[0]

    @property
    def capacity(self) -> int:
        keys = self._slot_layers[0].keys
        return 0 if keys is None else keys.shape[2]

    @property
    def window(self) -> int:
        return self.end - self.start

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._slot_layers[layer].keys, self._slot_layers[layer].values
        assert keys is not None and values is not None
        return keys, values

    # ---- a step -------------------------------------------------------------------------------

    def begin_step(self, lengths: Sequence[int]) -> tuple[SlotStep, torch.Tensor]:
        """Places a step: every running row's next token, then joiners with prompts of
        ``lengths``, in new slots. Returns the step and the packed (1, S) positions."""
        decoding, joining = self.rows, len(lengths)
        if decoding == 0:
            self.start = self.end = 0
        # A prompt of p tokens fills columns end-p+1..end: it needs end >= p - 1.
        self._make_room(decoding + joining, max(lengths, default=1) - 1)
        end = self.end
        columns = torch.arange(self.start, end + 1, device=self.device)  # (W+1,)
        mask = columns[None, :] >= self.row_start[:, None]  # (B, W+1)
        joins, offset = [], decoding
        for i, length in enumerate(lengths):
            joins.append((decoding + i, offset, length))
            offset += length
        step = SlotStep(self, decoding, joins, self.start, end, mask[:, None, None, :])
        positions = torch.cat(
            [end - self.row_start, *(torch.arange(n, device=self.device) for n in lengths)]
        )  # (S,)
        starts = torch.tensor([end + 1 - n for n in lengths], dtype=torch.long)
        self.row_start = torch.cat([self.row_start, starts.to(self.device)])
        self.rows += joining
        self.start = int(self.row_start.min())
        self.current = step
        return step, positions[None, :]

    def end_step(self) -> None:
        """The step's column is written: the next step writes the one after it."""
        self.current = None
        self.end += 1

    def remove(self, slots: list[int]) -> list[int]:
        """Frees ``slots``; each is filled by the last running row. Returns the new order:
        ``order[i]`` is the old slot of the row now in slot i."""
        order = list(range(self.rows))
        for slot in sorted(slots, reverse=True):
            last = len(order) - 1
            if slot != last:
                self._copy_slot(last, slot)
                self.row_start[slot] = self.row_start[last]
                order[slot] = order[last]
            order.pop()
        self.rows = len(order)
        self.row_start = self.row_start[: self.rows]
        self.start = int(self.row_start.min()) if self.rows else self.end
        return order

    # ---- room ---------------------------------------------------------------------------------

    def _make_room(self, slots: int, width: int) -> None:
        """Ensures ``slots`` slots, ``end >= width`` (room on the left for a prompt) and a
        free column at ``end``: in place when the buffers have room, else by moving the
        window to the left, else by doubling the buffers."""
        if slots <= self.slots and width <= self.end < self.capacity:
            return
        new_end = max(self.window, width)  # the window as far left as the prompts allow
        columns_fit = self.capacity - new_end > self.capacity // 4  # room to decode on
        if slots <= self.slots and columns_fit:
            self._move(new_end)
            return
        grown_slots = self.slots
        if slots > self.slots:
            grown_slots = max(slots, min(2 * self.slots, self.max_slots))
        capacity = self.capacity if columns_fit else max(2 * self.capacity, 2 * (new_end + 1), 64)
        self._grow(grown_slots, capacity, new_end)

    def _grow(self, slots: int, capacity: int, new_end: int) -> None:
        window, rows = self.window, self.rows
        shape = (slots, self._shape[0], capacity, self._shape[1])
        for layer in self._slot_layers:
            old_keys, old_values = layer.keys, layer.values
            # Zeros, not empty memory: masked columns still meet the values in a matmul
            # (weight 0 x NaN would be NaN), so they must hold finite numbers.
            layer.keys = torch.zeros(shape, dtype=self._dtype, device=self.device)
            layer.values = torch.zeros(shape, dtype=self._dtype, device=self.device)
            if old_keys is not None and old_values is not None and rows:
                span = slice(self.start, self.end)
                layer.keys[:rows, :, new_end - window : new_end] = old_keys[:rows, :, span]
                layer.values[:rows, :, new_end - window : new_end] = old_values[:rows, :, span]
            layer.is_initialized = True
        self._renumber(new_end)

    def _move(self, new_end: int) -> None:
        """Moves the running rows' columns so that the window ends at ``new_end``."""
        if new_end == self.end:
            return
        if self.rows:
            source = slice(self.start, self.end)
            target = slice(new_end - self.window, new_end)
            for layer in self._slot_layers:
                assert layer.keys is not None and layer.values is not None
                rows = slice(0, self.rows)
                layer.keys[rows, :, target] = layer.keys[rows, :, source].clone()
                layer.values[rows, :, target] = layer.values[rows, :, source].clone()
        self._renumber(new_end)

    def _renumber(self, new_end: int) -> None:
        by = new_end - self.end
        self.row_start = self.row_start + by
        self.start += by
        self.end = new_end

    def _copy_slot(self, source: int, target: int) -> None:
        span = slice(self.start, self.end)
        for layer in self._slot_layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys[target, :, span] = layer.keys[source, :, span]
            layer.values[target, :, span] = layer.values[source, :, span]
