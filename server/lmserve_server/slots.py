"""``SlotCache``: the running batch's KV cache, preallocated and written in place.

A ``DynamicCache`` grows by ``torch.cat`` on every decode step, so each step copies the
whole cache, and a row joining a running batch copies it again (padding, then concatenating).
On this CPU those copies cost as much as the model itself. Here every layer owns two buffers

    keys, values: (slots, kv_heads, capacity, head_dim)

and every row sits in a slot (rows ``0..B-1``; a leaving row's slot is filled by the last
row). All rows share one write column ``end``: a decode step writes each row's new key and
value at ``end`` and attends over the window ``[start, end]``, a view of the buffers, never
a copy. A row's own tokens are ``[row_start, end)``; columns left of its start (another row's
longer past, or stale data from the slot's previous row) are masked out. ``start`` is the
oldest running row's first column, so the window shrinks as long rows leave.

Copies happen only when they must: a joining row's prefilled keys are written into its slot
once; a leaving row's slot takes the last row's; and when ``end`` reaches the capacity the
window moves back to column 0 (or the buffers double when the window fills half of them).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; ``update`` writes the decode step's column and returns the window."""

    def __init__(self, window: SlotCache) -> None:
        super().__init__()
        self._window = window

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a SlotCache allocates its buffers when the first rows join")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        w = self._window
        rows, end = w.rows, w.end
        # (B, H, 1, D) into column `end` of the first B slots, in place.
        self.keys[:rows, :, end : end + 1] = key_states
        self.values[:rows, :, end : end + 1] = value_states
        return self.keys[:rows, :, w.start : end + 1], self.values[:rows, :, w.start : end + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._window.end - self._window.start + query_length, 0

    def get_seq_length(self) -> int:
        return self._window.end - self._window.start

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The running batch's cache: ``join`` writes prefilled rows, ``step_inputs`` gives the
    next decode step's mask and positions, ``advance`` moves past the step's column,
    ``remove`` frees slots. Not thread-safe: the decode thread alone drives it."""

    def __init__(self, num_layers: int, device: torch.device, max_slots: int = 0) -> None:
        self._slot_layers = [_SlotLayer(self) for _ in range(num_layers)]
        super().__init__(layers=list(self._slot_layers))
        self.device = device
        self.max_slots = max_slots  # a hint: slots double up to it (0: only as needed)
        self.rows = 0  # running rows, in slots 0..rows-1
        self.start = 0  # the window's first column
        self.end = 0  # the column the next decode step writes
        self.row_start = torch.zeros((0,), dtype=torch.long, device=device)  # (B,)

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

    # ---- rows in and out ----------------------------------------------------------------------

    def join(self, prefilled: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
        """Appends prefilled rows as slots ``rows..rows+N-1``: ``prefilled`` holds each
        layer's left-padded (N, H, W, D) keys and values; row i's prompt is its last
        ``lengths[i]`` columns."""
        new_keys = prefilled[0][0]
        joining, width = new_keys.shape[0], new_keys.shape[2]
        if self.rows == 0:
            self.start = self.end = 0
        self._make_room(self.rows + joining, width, new_keys)
        end, first = self.end, self.rows
        for layer, (keys, values) in zip(self._slot_layers, prefilled, strict=True):
            assert layer.keys is not None and layer.values is not None
            layer.keys[first : first + joining, :, end - width : end] = keys
            layer.values[first : first + joining, :, end - width : end] = values
        starts = torch.tensor([end - n for n in lengths], dtype=torch.long, device=self.device)
        self.row_start = torch.cat([self.row_start[:first], starts])
        self.rows += joining
        self.start = int(self.row_start.min())

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

    # ---- the decode step ----------------------------------------------------------------------

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's (B, 1, 1, window+1) boolean mask and (B, 1) positions."""
        self._make_room(self.rows, 0, None)
        columns = torch.arange(self.start, self.end + 1, device=self.device)  # (W+1,)
        mask = columns[None, :] >= self.row_start[:, None]  # (B, W+1)
        positions = (self.end - self.row_start)[:, None]  # (B, 1)
        return mask[:, None, None, :], positions

    def advance(self) -> None:
        """The step's column is written: the next step writes the one after it."""
        self.end += 1

    # ---- room ---------------------------------------------------------------------------------

    def _make_room(self, slots: int, width: int, like: torch.Tensor | None) -> None:
        """Ensures ``slots`` slots, ``end >= width`` (room on the left for a prefill that
        wide) and a free column at ``end``: in place when the buffers have room, else by
        moving the window to the left, else by doubling the buffers."""
        if slots <= self.slots and width <= self.end < self.capacity:
            return
        new_end = max(self.window, width)  # the window as far left as the prefill allows
        columns_fit = self.capacity - new_end > self.capacity // 4  # room to decode on
        if slots <= self.slots and columns_fit:
            self._move(new_end)
            return
        grown_slots = self.slots
        if slots > self.slots:
            grown_slots = max(slots, min(2 * self.slots, self.max_slots))
        capacity = self.capacity if columns_fit else max(2 * self.capacity, 2 * (new_end + 1), 64)
        self._grow(grown_slots, capacity, new_end, like)

    def _grow(self, slots: int, capacity: int, new_end: int, like: torch.Tensor | None) -> None:
        window, rows = self.window, self.rows
        for layer in self._slot_layers:
            old_keys, old_values = layer.keys, layer.values
            template = old_keys if old_keys is not None else like
            assert template is not None, "the first rows arrive through join()"
            # Zeros, not empty memory: masked columns still meet the values in a matmul
            # (weight 0 x NaN would be NaN), so they must hold finite numbers.
            shape = (slots, template.shape[1], capacity, template.shape[3])
            layer.keys, layer.values = template.new_zeros(shape), template.new_zeros(shape)
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
