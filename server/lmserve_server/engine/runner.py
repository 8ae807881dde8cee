"""``ModelRunner``: executes one continuous step from persistent buffers; it never decides.

A step is a list of ``Chunk``s from the scheduler: for each row in it, the tokens to put
through the model now (one for a decoding row, part of the prompt for a prefilling row),
the slot and position they go to, and whether to sample the row's next token after them.
The runner packs every integer and float the step needs into ONE host buffer, copies it to
the device in ONE upload, builds the attention layout there, runs ONE forward of the model
over the packed tokens, samples every row at once, and copies the sampled tokens back in
ONE download. Nothing else waits for the device.

Shapes: a step has as many tokens as its chunks. With ``fixed_shapes`` (for CUDA graphs),
steps where every chunk is one token are padded to the next bucket of rows (1, 2, 4, 8, ...)
with rows that write to the cache's scratch slot, and attention reads every slot's whole
length, so such a step's shapes depend on its bucket alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from lmserve_server.engine.attention import STEP_KEYWORD, StepAttention, install, mask_placeholder
from lmserve_server.engine.kv_cache import KVCache
from lmserve_server.engine.sampling import (
    RowSampling,
    host_columns,
    sample,
    tensors_from_columns,
)

_GREEDY = RowSampling()


@dataclass(frozen=True)
class Chunk:
    """One row's part of a step: ``tokens`` go to ``slot`` at positions ``start, start+1, ...``;
    with ``sampling`` set, the row's next token is drawn from the last one's logits."""

    slot: int
    tokens: Sequence[int]
    start: int
    sampling: RowSampling | None = None


def bucket(rows: int) -> int:
    """The padded row count of a fixed-shape step: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class _Columns:
    """Fills the step's host buffer: integer columns one after another, then the float
    columns (as float64 bits) right after them, so one copy moves them all."""

    def __init__(self, host: torch.Tensor) -> None:
        self._ints = host.numpy()
        self._at = 0
        self.placed: dict[str, tuple[int, int]] = {}
        self.floats = (0, 0)

    def put(self, name: str, values: Sequence[int]) -> None:
        n = len(values)
        self._ints[self._at : self._at + n] = values
        self.placed[name] = (self._at, n)
        self._at += n

    def put_floats(self, values: Sequence[float]) -> None:
        n = len(values)
        self._ints[self._at : self._at + n].view("float64")[:] = values
        self.floats = (self._at, n)
        self._at += n

    @property
    def used(self) -> int:
        return self._at


class _DeviceTimer:
    """The device's time for the model and sampling of a step: CUDA events on a GPU (read
    after the step's download has synchronised anyway), the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._started = self._stopped = 0.0

    def start(self) -> None:
        if self._cuda:
            self._begin.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._stopped = time.perf_counter()

    def seconds(self) -> float:
        if self._cuda:
            return float(self._begin.elapsed_time(self._end)) / 1000.0
        return self._stopped - self._started


class ModelRunner:
    """Runs steps of a loaded model over ``cache``. Not thread-safe: the engine thread."""

    def __init__(
        self,
        model: Any,
        cache: KVCache,
        *,
        max_step_tokens: int,
        fixed_shapes: bool = False,
    ) -> None:
        install(model)
        self._model = model
        self.cache = cache
        self.device = cache.device
        self.max_step_tokens = max_step_tokens
        self.fixed_shapes = fixed_shapes
        # The persistent buffers: every integer and float input of a step, side by side.
        rows = max(max_step_tokens, 2 * (cache.slots + 1))  # a padded bucket included
        capacity = 16 * rows  # every column of a step is at most `rows` long; 13 of them
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(capacity, dtype=torch.long, pin_memory=pinned)
        self._on_device = (
            self._host
            if self.device.type == "cpu"
            else torch.zeros_like(self._host, device=self.device)
        )
        self._host_tokens = torch.zeros(rows, dtype=torch.long, pin_memory=pinned)
        self._mask = mask_placeholder(self.device)
        self._device_timer = _DeviceTimer(self.device)
        self.last_device_s = 0.0  # the last step's model and sampling time on the device

    def execute(self, chunks: Sequence[Chunk]) -> list[int]:
        """Runs the step; returns the sampled token of each chunk that has ``sampling``, in
        the order of ``chunks``."""
        decode = [c for c in chunks if len(c.tokens) == 1]
        prefill = [c for c in chunks if len(c.tokens) > 1]
        padded = self.fixed_shapes and not prefill
        if padded:
            scratch = Chunk(self.cache.scratch_slot, (0,), 0, _GREEDY)
            decode += [scratch] * (bucket(len(decode)) - len(decode))
        ordered = decode + prefill  # the packed order: single tokens first
        sampled = [i for i, c in enumerate(ordered) if c.sampling is not None or padded]
        settings = [ordered[i].sampling or _GREEDY for i in sampled]
        columns, build_attention = self._layout(decode, prefill, ordered, sampled, settings)
        inputs = self._upload(columns)
        every_token_sampled = len(sampled) == len(ordered) and not prefill
        self._device_timer.start()
        with torch.inference_mode():
            out = self._model(
                input_ids=inputs["ids"][None],
                position_ids=inputs["positions"][None],
                attention_mask=self._mask,
                use_cache=False,
                logits_to_keep=0 if every_token_sampled else inputs["keep"],
                **{STEP_KEYWORD: build_attention(inputs)},
            )
            params = tensors_from_columns(settings, inputs["top_k"], inputs["floats"])
            tokens = sample(out.logits[0], params)  # (R,)
        self._device_timer.stop()
        chosen = self._download(tokens)
        self.last_device_s = self._device_timer.seconds()
        by_place = dict(zip(sampled, chosen, strict=True))
        place = {id(c): i for i, c in enumerate(ordered)}
        return [by_place[place[id(c)]] for c in chunks if c.sampling is not None]

    # ---- the step's inputs ------------------------------------------------------------------

    def _layout(
        self,
        decode: list[Chunk],
        prefill: list[Chunk],
        ordered: list[Chunk],
        sampled: list[int],
        settings: list[RowSampling],
    ) -> tuple[_Columns, Callable[[dict[str, torch.Tensor]], StepAttention]]:
        """Writes the step's inputs into the host buffer; returns where each column is and
        how to build the ``StepAttention`` from their device copies."""
        cache = self.cache
        columns = _Columns(self._host)
        columns.put("ids", [t for c in ordered for t in c.tokens])
        columns.put("positions", [c.start + i for c in ordered for i in range(len(c.tokens))])
        columns.put("slots", [c.slot for c in ordered for _ in c.tokens])
        last_token = list(accumulate(len(c.tokens) for c in ordered))
        columns.put("keep", [last_token[i] - 1 for i in sampled])
        top_k, floats = host_columns(settings)
        columns.put("top_k", top_k)

        # Single-token rows attend as one batch over the slots [0, span).
        if self.fixed_shapes:
            span, window = cache.slots + 1, cache.slot_tokens
        else:
            span = max((c.slot for c in decode), default=-1) + 1
            window = max((c.start + 1 for c in decode), default=0)
        lengths = [1] * span
        for c in decode:
            lengths[c.slot] = c.start + 1
        columns.put("decode_slots", [c.slot for c in decode])
        columns.put("decode_lengths", lengths)
        contiguous = span == len(decode) and all(c.slot == i for i, c in enumerate(decode))

        columns.put("prefill_slots", [c.slot for c in prefill])
        columns.put("prefill_starts", [c.start for c in prefill])
        columns.put("prefill_lengths", [len(c.tokens) for c in prefill])
        columns.put("prefill_rows", [p for p, c in enumerate(prefill) for _ in c.tokens])
        columns.put("prefill_columns", [i for c in prefill for i in range(len(c.tokens))])
        columns.put_floats(floats)
        width = max((len(c.tokens) for c in prefill), default=0)
        prefill_window = max((c.start + len(c.tokens) for c in prefill), default=0)
        fresh = len(prefill) == 1 and prefill[0].start == 0

        def build(inputs: dict[str, torch.Tensor]) -> StepAttention:
            return StepAttention(
                cache=cache,
                token_slots=inputs["slots"],
                token_positions=inputs["positions"],
                decode_count=len(decode),
                decode_slots=inputs["decode_slots"],
                decode_span=span,
                decode_contiguous=contiguous,
                decode_window=window,
                decode_lengths=inputs["decode_lengths"],
                prefill_count=len(prefill),
                prefill_slots=inputs["prefill_slots"],
                prefill_starts=inputs["prefill_starts"],
                prefill_lengths=inputs["prefill_lengths"],
                prefill_rows=inputs["prefill_rows"],
                prefill_columns=inputs["prefill_columns"],
                prefill_width=width,
                prefill_window=prefill_window,
                prefill_fresh=fresh,
            )

        return columns, build

    def _upload(self, columns: _Columns) -> dict[str, torch.Tensor]:
        """The one host-to-device copy of the step; returns the columns' device views."""
        used = columns.used
        if self._on_device is not self._host:
            self._on_device[:used].copy_(self._host[:used], non_blocking=True)
        views = {
            name: self._on_device[start : start + n] for name, (start, n) in columns.placed.items()
        }
        start, n = columns.floats
        views["floats"] = self._on_device[start : start + n].view(torch.float64)
        return views

    def _download(self, tokens: torch.Tensor) -> list[int]:
        """The one device-to-host copy of the step: its sampled tokens."""
        if self.device.type == "cpu":
            return list(tokens.tolist())
        n = tokens.shape[0]
        self._host_tokens[:n].copy_(tokens, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return list(self._host_tokens[:n].tolist())
