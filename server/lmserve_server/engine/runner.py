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
length, so such a step's shapes depend on its bucket alone; and the model's inputs of such a
step sit at the same places of the persistent buffer for every step of the bucket.

Step graphs (``capture_graphs``): the forward of a decode-only step of each bucket is captured
once (``torch.cuda.graph`` on CUDA), over views of the persistent buffer; a later step of that
bucket writes its inputs where the capture read them and replays it, so the step's hundreds
of kernel launches cost one. Sampling runs after it, eagerly. ``eager_capture`` is the same
discipline without a GPU: its "replay" runs the captured closure again, over the same views,
so a step that put its inputs anywhere else would get a captured step's tokens (the tests'
check that the discipline holds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from lmserve_server.engine.attention import (
    STEP_KEYWORD,
    DecodeRun,
    StepAttention,
    install,
    mask_placeholder,
    plan_decode_runs,
)
from lmserve_server.engine.kv_cache import KVCache
from lmserve_server.engine.sampling import RowSampling, columns_of, sample, tensors_from, unpack
from lmserve_server.engine.types import TokenLogprob

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


# How a forward is captured: returns a replay function and the forward's output tensor,
# which every replay writes anew.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def cuda_graph_capture(
    forward: Callable[[], torch.Tensor],
) -> tuple[Callable[[], None], torch.Tensor]:
    """Captures ``forward`` as a CUDA graph (after warming it up on a side stream, as
    PyTorch's CUDA-graph notes ask)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = forward()
    return graph.replay, output


def eager_capture(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """A graph's discipline without a GPU: the output tensor is fixed, and a replay runs the
    captured closure again over the same input views."""
    output = forward()

    def replay() -> None:
        output.copy_(forward())

    return replay, output


@dataclass
class _StepGraph:
    replay: Callable[[], None]
    logits: torch.Tensor  # (1, bucket, V): written by every replay
    placed: dict[str, tuple[int, int, bool]]  # where its inputs must be


@dataclass(frozen=True)
class SampledToken:
    """A chunk's new token, with its logprob when the row asked for them."""

    token: int
    logprob: TokenLogprob | None = None


class _Inputs:
    """A step's inputs by name: integer columns, and float columns (sent as float64 bits)."""

    def __init__(self) -> None:
        self.ints: dict[str, Sequence[int]] = {}
        self.floats: dict[str, Sequence[float]] = {}

    @property
    def size(self) -> int:
        return sum(map(len, self.ints.values())) + sum(map(len, self.floats.values()))

    def write(self, host: torch.Tensor) -> dict[str, tuple[int, int, bool]]:
        """Writes every column into ``host`` (int64), side by side; returns where each went
        as (start, length, is_float)."""
        buffer = host.numpy()
        placed = {}
        at = 0
        for name, values in self.ints.items():
            buffer[at : at + len(values)] = values
            placed[name] = (at, len(values), False)
            at += len(values)
        for name, floats in self.floats.items():
            buffer[at : at + len(floats)].view("float64")[:] = floats
            placed[name] = (at, len(floats), True)
            at += len(floats)
        return placed


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
        self._pinned = self.device.type == "cuda"
        # The persistent buffers: every input of a step side by side, grown (rarely: long
        # penalty histories) when a step needs more.
        rows = max(max_step_tokens, 2 * (cache.slots + 1))  # a padded bucket included
        self._allocate(16 * rows)
        self._mask = mask_placeholder(self.device)
        self._device_timer = _DeviceTimer(self.device)
        self.last_device_s = 0.0  # the last step's model and sampling time on the device
        self._graphs: dict[int, _StepGraph] = {}  # by bucket (fixed shapes only)
        self.graph_replays = 0

    def drop_graphs(self) -> None:
        """Forgets the captured steps and pads no more: every step runs eagerly."""
        self._graphs.clear()
        self.fixed_shapes = False

    def capture_graphs(self, capture: Capture, max_rows: int) -> list[int]:
        """Captures a decode-only step for every bucket up to ``max_rows`` rows (fixed shapes
        only); returns the buckets captured."""
        if not self.fixed_shapes:
            raise ValueError("step graphs need fixed_shapes")
        buckets = []
        size = 1
        while size <= bucket(max_rows):
            buckets.append(size)
            size *= 2
        for rows in buckets:
            chunks = [Chunk(self.cache.scratch_slot, (0,), 0, _GREEDY)] * rows
            inputs, build_attention = self._layout(chunks, [], chunks, list(range(rows)))
            views, placed = self._upload(inputs)
            attention = build_attention(views)

            def forward(
                views: dict[str, torch.Tensor] = views, attention: StepAttention = attention
            ) -> torch.Tensor:
                # The masks are built from the buffer's lengths inside the forward: a graph
                # replays those kernels; a Python re-run must not reuse the last ones.
                attention.forget_masks()
                with torch.inference_mode():
                    out = self._model(
                        input_ids=views["ids"][None],
                        position_ids=views["positions"][None],
                        attention_mask=self._mask,
                        use_cache=False,
                        logits_to_keep=0,
                        **{STEP_KEYWORD: attention},
                    )
                return out.logits

            replay, logits = capture(forward)
            self._graphs[rows] = _StepGraph(replay, logits, placed)
        return buckets

    def _allocate(self, size: int) -> None:
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=self._pinned)
        self._on_device = (
            self._host
            if self.device.type == "cpu"
            else torch.zeros_like(self._host, device=self.device)
        )
        self._host_out = torch.zeros(size, dtype=torch.float64, pin_memory=self._pinned)

    def execute(self, chunks: Sequence[Chunk]) -> list[SampledToken]:
        """Runs the step; returns the new token of each chunk that has ``sampling``, in the
        order of ``chunks``."""
        decode = sorted((c for c in chunks if len(c.tokens) == 1), key=lambda c: c.slot)
        prefill = [c for c in chunks if len(c.tokens) > 1]
        padded = self.fixed_shapes and not prefill
        if padded:
            scratch = Chunk(self.cache.scratch_slot, (0,), 0, _GREEDY)
            decode += [scratch] * (bucket(len(decode)) - len(decode))
        ordered = decode + prefill  # the packed order: single tokens first
        sampled = [i for i, c in enumerate(ordered) if c.sampling is not None or padded]
        settings = [ordered[i].sampling or _GREEDY for i in sampled]
        inputs, build_attention = self._layout(decode, prefill, ordered, sampled)
        sampling = columns_of(settings)
        inputs.ints.update(sampling.ints)
        inputs.floats.update(sampling.floats)
        graph = self._graphs.get(len(decode)) if padded else None
        views, placed = self._upload(inputs)
        every_token_sampled = len(sampled) == len(ordered) and not prefill
        self._device_timer.start()
        with torch.inference_mode():
            if graph is not None and _same_places(graph.placed, placed):
                graph.replay()  # reads the inputs just written where it was captured
                logits = graph.logits
                self.graph_replays += 1
            else:
                logits = self._model(
                    input_ids=views["ids"][None],
                    position_ids=views["positions"][None],
                    attention_mask=self._mask,
                    use_cache=False,
                    logits_to_keep=0 if every_token_sampled else views["keep"],
                    **{STEP_KEYWORD: build_attention(views)},
                ).logits
            chosen = sample(logits[0], tensors_from(sampling, views))  # (R, ...)
        self._device_timer.stop()
        picked = self._download(chosen.packed())
        self.last_device_s = self._device_timer.seconds()
        by_place = dict(zip(sampled, picked, strict=True))
        place = {id(c): i for i, c in enumerate(ordered)}
        results = []
        for c in chunks:
            if c.sampling is not None:
                token, logprob = unpack(by_place[place[id(c)]], c.sampling.logprobs)
                results.append(SampledToken(token, logprob))
        return results

    # ---- the step's inputs ------------------------------------------------------------------

    def _layout(
        self,
        decode: list[Chunk],
        prefill: list[Chunk],
        ordered: list[Chunk],
        sampled: list[int],
    ) -> tuple[_Inputs, Callable[[dict[str, torch.Tensor]], StepAttention]]:
        """The step's inputs, and how to build the ``StepAttention`` from their device
        copies."""
        cache = self.cache
        inputs = _Inputs()
        columns = inputs.ints
        columns["ids"] = [t for c in ordered for t in c.tokens]
        columns["positions"] = [c.start + i for c in ordered for i in range(len(c.tokens))]
        columns["slots"] = [c.slot for c in ordered for _ in c.tokens]
        last_token = list(accumulate(len(c.tokens) for c in ordered))
        columns["keep"] = [last_token[i] - 1 for i in sampled]

        # Single-token rows: eagerly in runs of neighbouring slots (``decode`` is in slot
        # order), each run up to its longest row; with fixed shapes as one batch over every
        # slot's whole length, as the captured graph did.
        runs: tuple[DecodeRun, ...] | None = None
        if self.fixed_shapes:
            span, window = cache.slots + 1, cache.slot_tokens
            lengths = [1] * span
            for c in decode:
                lengths[c.slot] = c.start + 1
        else:
            lengths = [c.start + 1 for c in decode]
            span, window = len(decode), max(lengths, default=0)
            runs = plan_decode_runs([c.slot for c in decode], lengths)
        columns["decode_slots"] = [c.slot for c in decode]
        columns["decode_lengths"] = lengths

        columns["prefill_slots"] = [c.slot for c in prefill]
        columns["prefill_starts"] = [c.start for c in prefill]
        columns["prefill_lengths"] = [len(c.tokens) for c in prefill]
        columns["prefill_rows"] = [p for p, c in enumerate(prefill) for _ in c.tokens]
        columns["prefill_columns"] = [i for c in prefill for i in range(len(c.tokens))]
        width = max((len(c.tokens) for c in prefill), default=0)
        prefill_window = max((c.start + len(c.tokens) for c in prefill), default=0)
        fresh = len(prefill) == 1 and prefill[0].start == 0

        def build(views: dict[str, torch.Tensor]) -> StepAttention:
            return StepAttention(
                cache=cache,
                token_slots=views["slots"],
                token_positions=views["positions"],
                decode_count=len(decode),
                decode_slots=views["decode_slots"],
                decode_span=span,
                decode_runs=runs,
                decode_window=window,
                decode_lengths=views["decode_lengths"],
                prefill_count=len(prefill),
                prefill_slots=views["prefill_slots"],
                prefill_starts=views["prefill_starts"],
                prefill_lengths=views["prefill_lengths"],
                prefill_rows=views["prefill_rows"],
                prefill_columns=views["prefill_columns"],
                prefill_width=width,
                prefill_window=prefill_window,
                prefill_fresh=fresh,
            )

        return inputs, build

    def _upload(
        self, inputs: _Inputs
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int, bool]]]:
        """The one host-to-device copy of the step; returns the columns' device views, and
        where each column went."""
        if inputs.size > self._host.numel():
            self._allocate(2 * inputs.size)
            self._graphs.clear()  # they read the old buffer; steps run eagerly from now on
        placed = inputs.write(self._host)
        used = inputs.size
        if self._on_device is not self._host:
            self._on_device[:used].copy_(self._host[:used], non_blocking=True)
        views = {}
        for name, (start, n, is_float) in placed.items():
            view = self._on_device[start : start + n]
            views[name] = view.view(torch.float64) if is_float else view
        return views, placed

    def _download(self, packed: torch.Tensor) -> list[list[float]]:
        """The one device-to-host copy of the step: its sampled tokens (and logprobs)."""
        if self.device.type == "cpu":
            return list(packed.tolist())
        out = self._host_out[: packed.numel()].view(packed.shape)
        out.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return list(out.tolist())


# The columns a captured forward reads; the sampling columns after them may vary.
_MODEL_INPUTS = ("ids", "positions", "slots", "decode_slots", "decode_lengths")


def _same_places(
    captured: dict[str, tuple[int, int, bool]], now: dict[str, tuple[int, int, bool]]
) -> bool:
    """Whether this step's model inputs sit where the captured forward reads them."""
    return all(captured[name] == now[name] for name in _MODEL_INPUTS)
