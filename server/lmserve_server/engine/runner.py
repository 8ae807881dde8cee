"""``ModelRunner``: executes one continuous step from persistent buffers; it never decides.

A step is a list of ``Chunk``s from the scheduler: for each row in it, the tokens to put
through the model now (one for a decoding row, part of the prompt for a prefilling row),
the slot and position they go to, and whether to sample the row's next token after them.
The runner packs every integer the step needs into ONE host buffer (headed by the slots'
sampling table, ``SamplingSlots``), copies it to the device in ONE upload, builds the
attention layout there, runs ONE forward of the model over the packed tokens, samples every
row at once, and copies the sampled tokens back in ONE download. Nothing else waits for the
device. The buffers are sized for the largest step up front and never move.

``launch`` queues all of that and returns; ``collect`` waits for the download and reads the
tokens. On a GPU the caller does the previous step's host work (text, stop strings,
streams) in between, while the device runs; on a CPU ``launch`` computes everything.

Shapes: a step has as many tokens as its chunks. With ``fixed_shapes`` (for CUDA graphs),
steps where every chunk is one token are padded to the next bucket of rows (1, 2, 4, 8, ...)
with rows that write to the cache's scratch slot, and attention reads every slot up to a
bucket of columns (64, 128, ... the slot's length) that holds the longest row, so such a
step's shapes depend on its two buckets alone; and the model's inputs of such a step sit at
the same places of the persistent buffer for every step of the row bucket.

Step graphs (``capture_graphs``): the forward of a decode-only step of each pair of buckets is
captured once (``CudaGraphCapture``: ``torch.cuda.graph``, all in one memory pool, largest
first, as vLLM does), over views of the persistent buffer; a later step of those buckets
writes its inputs where the capture read them and replays it, so the step's hundreds of
kernel launches cost one. Sampling runs after it, eagerly. ``rerun_capture`` stands in for
it without a GPU: its "replay" runs the captured closure again over the same views, so a step
that put its inputs anywhere else would get a captured step's tokens (the tests' check that
the discipline holds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch

from lmserve_server.engine.attention import (
    STEP_KEYWORD,
    DecodeRun,
    StepAttention,
    install,
    mask_placeholder,
    plan_decode_runs,
    prefill_tiles,
)
from lmserve_server.engine.kv_cache import KVCache, blocks_for
from lmserve_server.engine.prefix_cache import BLOCK
from lmserve_server.engine.sampling import Sampled, sample, unpack
from lmserve_server.engine.sampling_slots import SamplingSlots
from lmserve_server.engine.types import TokenLogprob
from lmserve_server.limits import MAX_LOGPROBS

if TYPE_CHECKING:
    from lmserve_server.grammar.bitmask import BitmaskApplier
    from lmserve_server.grammar.matcher import RowMatcher

# The narrowest attention window of a captured decode step.
MIN_WINDOW = 64


@dataclass(frozen=True)
class Chunk:
    """One row's part of a step: ``tokens`` go to positions ``start, start+1, ...`` of the
    row whose block table is ``blocks`` (it covers them); with ``sample``, the row's next
    token is drawn from the last one's logits (with its ``slot``'s sampling settings, and
    only among the tokens its ``grammar`` allows next)."""

    slot: int
    tokens: Sequence[int]
    start: int
    sample: bool = False
    grammar: RowMatcher | None = None
    blocks: Sequence[int] = ()


def bucket(rows: int) -> int:
    """The padded row count of a fixed-shape step: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def window_buckets(row_tokens: int) -> list[int]:
    """The attention windows of captured decode steps: powers of two from ``MIN_WINDOW``,
    and the longest row's whole length in blocks."""
    windows = []
    size = MIN_WINDOW
    while size < row_tokens:
        windows.append(size)
        size *= 2
    return [*windows, blocks_for(row_tokens) * BLOCK]


def window_bucket(longest: int, row_tokens: int) -> int:
    """The smallest captured window that holds a row of ``longest`` tokens."""
    return next(w for w in window_buckets(row_tokens) if w >= longest)


# How a forward is captured: returns a replay function and the forward's output tensor,
# which every replay writes anew.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


class CudaGraphCapture:
    """Captures forwards as CUDA graphs (after warming each up on a side stream, as
    PyTorch's CUDA-graph notes ask), all in one memory pool: a step replays one graph at a
    time, and each graph keeps its own output, so their work memory can be shared."""

    def __init__(self) -> None:
        self._pool: Any = None

    def __call__(
        self, forward: Callable[[], torch.Tensor]
    ) -> tuple[Callable[[], None], torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = forward()
        return graph.replay, output


def rerun_capture(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
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
    placed: dict[str, tuple[int, int]]  # where its inputs must be


@dataclass(frozen=True)
class SampledToken:
    """A chunk's new token, with its logprob when the row asked for them."""

    token: int
    logprob: TokenLogprob | None = None


class _Inputs:
    """A step's integer inputs by name."""

    def __init__(self) -> None:
        self.ints: dict[str, Sequence[int]] = {}

    @property
    def size(self) -> int:
        return sum(map(len, self.ints.values()))

    def write(self, host: torch.Tensor, at: int) -> dict[str, tuple[int, int]]:
        """Writes every column into ``host`` (int64) from ``at``, side by side; returns
        where each went as (start, length)."""
        buffer = host.numpy()
        placed = {}
        for name, values in self.ints.items():
            buffer[at : at + len(values)] = values
            placed[name] = (at, len(values))
            at += len(values)
        return placed


class _Device:
    """What differs between a GPU and a CPU for a step: where the host stages the inputs and
    the outputs (pinned memory on a GPU), how the host waits for the device, and how the
    device's time is measured (CUDA events; the wall clock on a CPU). ``staged`` on a CPU
    stages through separate buffers as a GPU does, so a test reaches those paths."""

    def __init__(self, device: torch.device, *, staged: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.staged = staged or self.cuda
        self._events: tuple[Any, Any] | None = None
        if self.cuda:
            self._events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
        self._times = [0.0, 0.0]

    def host_buffer(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(size, dtype=dtype, pin_memory=self.cuda)

    def device_buffer(self, host: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(host, device=self.device) if self.staged else host

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def mark(self, which: int) -> None:
        """Notes the start (0) or the end (1) of the device's part of a step."""
        if self._events is not None:
            self._events[which].record()
        else:
            self._times[which] = time.perf_counter()

    def seconds(self) -> float:
        """Between the marks (after ``synchronize``)."""
        if self._events is not None:
            return float(self._events[0].elapsed_time(self._events[1])) / 1000.0
        return self._times[1] - self._times[0]


@dataclass
class Launched:
    """A step queued on the device: what ``collect`` needs to read its tokens."""

    chunks: Sequence[Chunk]
    places: dict[int, int]  # id of a sampling chunk -> its row of the download
    slots: list[int]  # the sampled rows' slots (bucket padding excluded)
    packed: torch.Tensor | None  # (R, width) on the host buffer once collected
    width: int


class ModelRunner:
    """Runs steps of a loaded model over ``cache``. Not thread-safe: the engine thread."""

    def __init__(
        self,
        model: Any,
        cache: KVCache,
        *,
        vocab: int,
        end_token_ids: frozenset[int],
        max_step_tokens: int,
        fixed_shapes: bool = False,
        staged: bool = False,
    ) -> None:
        install(model)
        self._model = model
        self.cache = cache
        self.device = cache.device
        self.max_step_tokens = max_step_tokens
        self.fixed_shapes = fixed_shapes
        self._device = _Device(self.device, staged=staged)
        # The persistent buffers, sized for the largest step: the slots' sampling table,
        # then every column of a step (at most 12 values per token of a step of the most
        # tokens, a padded bucket of every slot included), side by side.
        table = SamplingSlots.size_of(cache.slots + 1)
        self._most_tokens = max(max_step_tokens, bucket(cache.slots + 1))
        # The blocks a step reads: every row up to the longest row, decoding (a padded
        # bucket) or prefilling (chunks of two tokens at least).
        most_reads = (bucket(cache.slots + 1) + max_step_tokens // 2) * blocks_for(cache.row_tokens)
        self._host = self._device.host_buffer(
            table + 16 * self._most_tokens + most_reads, torch.long
        )
        self._on_device = self._device.device_buffer(self._host)
        self._table_size = table
        self.sampling = SamplingSlots(
            cache.slots + 1,
            vocab,
            self.device,
            end_token_ids,
            host=self._host[:table],
            on_device=self._on_device[:table],
        )
        rows = bucket(cache.slots + 1)
        self._host_out = self._device.host_buffer(rows * (2 + 2 * MAX_LOGPROBS), torch.float64)
        self._mask = mask_placeholder(self.device)
        self.last_device_s = 0.0  # the last step's model and sampling time on the device
        self._graphs: dict[tuple[int, int], _StepGraph] = {}  # by (rows, window) bucket
        self.graph_replays = 0
        # Structured output's masks: a host buffer of a row per sampled row of the largest
        # step, made when the first grammar comes (``grammar/bitmask.py``).
        self._masks: torch.Tensor | None = None
        self._mask_applier: BitmaskApplier | None = None

    def drop_graphs(self) -> None:
        """Forgets the captured steps and pads no more: every step runs eagerly."""
        self._graphs.clear()
        self.fixed_shapes = False

    def capture_graphs(self, capture: Capture, max_rows: int) -> list[tuple[int, int]]:
        """Captures a decode-only step for every bucket of rows up to ``max_rows`` and every
        window bucket (fixed shapes only), largest first; returns the (rows, window) pairs."""
        if not self.fixed_shapes:
            raise ValueError("step graphs need fixed_shapes")
        buckets = []
        size = 1
        while size <= bucket(max_rows):
            buckets.append(size)
            size *= 2
        pairs = [
            (rows, window)
            for rows in reversed(buckets)
            for window in reversed(window_buckets(self.cache.row_tokens))
        ]
        for rows, window in pairs:
            chunks = [self._scratch_chunk()] * rows
            inputs, build_attention = self._layout(chunks, [], chunks, window)
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
            self._graphs[rows, window] = _StepGraph(replay, logits, placed)
        return list(reversed(pairs))

    # ---- a step ---------------------------------------------------------------------------------

    def execute(self, chunks: Sequence[Chunk]) -> list[SampledToken]:
        """``launch`` then ``collect``."""
        return self.collect(self.launch(chunks))

    def launch(self, chunks: Sequence[Chunk]) -> Launched:
        """Queues the step on the device: upload, forward, sampling, and the download of
        its tokens into the host buffer (on a CPU, all of it done on return)."""
        # Shortest first: the runs of the decode attention are rows of similar lengths.
        decode = sorted((c for c in chunks if len(c.tokens) == 1), key=lambda c: c.start)
        prefill = [c for c in chunks if len(c.tokens) > 1]
        padded = self.fixed_shapes and not prefill
        window = 0
        if padded:
            window = window_bucket(max(c.start + 1 for c in decode), self.cache.row_tokens)
            decode += [self._scratch_chunk()] * (bucket(len(decode)) - len(decode))
        ordered = decode + prefill  # the packed order: single tokens first
        sampled = [i for i, c in enumerate(ordered) if c.sample]
        inputs, build_attention = self._layout(decode, prefill, ordered, window)
        graph = self._graphs.get((len(decode), window)) if padded else None
        views, placed = self._upload(inputs)
        every_token_sampled = len(sampled) == len(ordered) and not prefill
        device = self._device
        device.mark(0)
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
            slots = [ordered[i].slot for i in sampled]
            # Filled on the host while the device runs the forward (queued just above).
            masks = self._grammar_masks([ordered[i] for i in sampled])
            chosen = self._sample(logits[0], views, slots, masks)
        device.mark(1)
        packed = chosen.packed()
        out = self._host_out[: packed.numel()].view(packed.shape) if device.staged else None
        if out is not None:
            out.copy_(packed, non_blocking=True)
        places = {id(ordered[i]): n for n, i in enumerate(sampled)}
        scratch_slot = self.cache.scratch_slot
        real = [s for s in slots if s != scratch_slot]
        return Launched(chunks, places, real, out if out is not None else packed, chosen.width)

    def collect(self, launched: Launched) -> list[SampledToken]:
        """Waits for the step; returns the new token of each chunk that samples, in the
        order of its ``chunks``."""
        self._device.synchronize()
        self.last_device_s = self._device.seconds()
        assert launched.packed is not None
        picked = launched.packed.tolist()
        self.sampling.advance(launched.slots)
        results = []
        for c in launched.chunks:
            if c.sample:
                values = picked[launched.places[id(c)]]
                token, logprob = unpack(values, self.sampling.logprobs(c.slot))
                results.append(SampledToken(token, logprob))
        return results

    def _sample(
        self,
        logits: torch.Tensor,
        views: dict[str, torch.Tensor],
        slots: list[int],
        masks: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> Sampled:
        """Every sampled row's token, the slots' token history kept up to date."""
        sampling = self.sampling
        sampling.mark_seen(views["slots"], views["ids"])
        on_device = views["sample_slots"]
        rows = sampling.rows(slots, on_device)
        if masks is not None:
            rows.grammar_rows, rows.grammar_masks = masks
            rows.grammar_applier = self._mask_applier
        chosen = sample(logits, rows, device_only=self._device.cuda)
        sampling.count(on_device, chosen.tokens)
        return chosen

    def _grammar_masks(self, sampled: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sampled rows under a grammar: their places among the sampled rows, and the
        tokens each may take next as a bitmask, on the device; None when no row has one."""
        constrained = [(n, c.grammar) for n, c in enumerate(sampled) if c.grammar is not None]
        if not constrained:
            return None
        from lmserve_server.grammar.bitmask import BitmaskApplier, bitmask_words
        from lmserve_server.grammar.matcher import fill_bitmasks

        if self._masks is None:
            width = bitmask_words(constrained[0][1].vocab_size)
            rows = bucket(self.cache.slots + 1)
            self._masks = self._device.host_buffer(rows * width, torch.int32).view(rows, width)
            self._mask_applier = BitmaskApplier(self.device, torch.float32)
        masks = self._masks[: len(constrained)]
        fill_bitmasks([(matcher, i) for i, (_, matcher) in enumerate(constrained)], masks)
        places = torch.tensor([n for n, _ in constrained])
        if self._device.staged:
            places = places.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
        return places, masks

    # ---- the step's inputs ------------------------------------------------------------------

    def _scratch_chunk(self) -> Chunk:
        """A row that pads a fixed-shape step: it writes to the scratch block."""
        return Chunk(self.cache.scratch_slot, (0,), 0, True, blocks=(self.cache.scratch_block,))

    def _layout(
        self,
        decode: list[Chunk],
        prefill: list[Chunk],
        ordered: list[Chunk],
        window: int,
    ) -> tuple[_Inputs, Callable[[dict[str, torch.Tensor]], StepAttention]]:
        """The step's inputs, and how to build the ``StepAttention`` from their device
        copies. ``window``: the columns of a fixed-shape decode step."""
        cache = self.cache
        inputs = _Inputs()
        columns = inputs.ints
        columns["ids"] = [t for c in ordered for t in c.tokens]
        columns["positions"] = [c.start + i for c in ordered for i in range(len(c.tokens))]
        columns["slots"] = [c.slot for c in ordered for _ in c.tokens]
        columns["token_blocks"] = [
            c.blocks[(c.start + i) // BLOCK] for c in ordered for i in range(len(c.tokens))
        ]
        columns["token_offsets"] = [
            (c.start + i) % BLOCK for c in ordered for i in range(len(c.tokens))
        ]
        last_token = list(accumulate(len(c.tokens) for c in ordered))
        sampled = [i for i, c in enumerate(ordered) if c.sample]
        columns["keep"] = [last_token[i] - 1 for i in sampled]
        columns["sample_slots"] = [ordered[i].slot for i in sampled]

        # The blocks the step reads, row by row: single-token rows (``decode``, shortest
        # first) in runs of similar lengths, each row its run's blocks (the scratch block
        # past its own); with fixed shapes one run over the bucket and ``window``, as the
        # captured graph did. Then each prefill chunk's row up to the chunk's last tile.
        lengths = [c.start + 1 for c in decode]
        if self.fixed_shapes and decode:
            window = window or blocks_for(max(lengths)) * BLOCK
            spans = [(0, len(decode))]
        else:
            spans = plan_decode_runs(lengths)
        gather: list[int] = []
        runs = []
        scratch = cache.scratch_block
        for first, count in spans:
            longest = window if self.fixed_shapes else lengths[first + count - 1]
            n = blocks_for(longest)
            runs.append(
                DecodeRun(
                    first,
                    count,
                    len(gather),
                    n,
                    longest,
                    self.fixed_shapes or lengths[first] != longest,
                )
            )
            for c in decode[first : first + count]:
                own = c.blocks[:n]
                gather += [*own, *[scratch] * (n - len(own))]
        chunk_blocks = []
        for c in prefill:
            chunk_blocks.append((len(gather), c.start, len(c.tokens)))
            gather += c.blocks[: blocks_for(c.start + len(c.tokens))]
        columns["gather"] = gather
        columns["decode_lengths"] = lengths
        tiles, tile_of, tile_rows = prefill_tiles(chunk_blocks)
        columns["prefill_tile_of"] = tile_of
        columns["prefill_tile_rows"] = tile_rows
        decode_window = max((r.window for r in runs), default=0)

        def build(views: dict[str, torch.Tensor]) -> StepAttention:
            return StepAttention(
                cache=cache,
                token_blocks=views["token_blocks"],
                token_offsets=views["token_offsets"],
                gather=views["gather"],
                decode_count=len(decode),
                decode_runs=tuple(runs),
                decode_window=decode_window,
                decode_lengths=views["decode_lengths"],
                prefill_count=len(prefill),
                prefill_tiles=tiles,
                prefill_tile_of=views["prefill_tile_of"],
                prefill_tile_rows=views["prefill_tile_rows"],
            )

        return inputs, build

    def _upload(
        self, inputs: _Inputs
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
        """The one host-to-device copy of the step (the sampling table and the step's
        columns); returns the columns' device views, and where each column went."""
        used = self._table_size + inputs.size
        if used > self._host.numel():  # the buffer is sized for the largest step
            raise RuntimeError(
                f"a step of {len(inputs.ints['ids'])} tokens needs {used} input values; "
                f"the buffer holds {self._host.numel()}"
            )
        placed = inputs.write(self._host, self._table_size)
        if self._device.staged:
            self._on_device[:used].copy_(self._host[:used], non_blocking=True)
        views = {name: self._on_device[start : start + n] for name, (start, n) in placed.items()}
        return views, placed


# The columns a captured forward reads; the sampling columns after them may vary.
_MODEL_INPUTS = ("ids", "positions", "token_blocks", "token_offsets", "gather", "decode_lengths")


def _same_places(captured: dict[str, tuple[int, int]], now: dict[str, tuple[int, int]]) -> bool:
    """Whether this step's model inputs sit where the captured forward reads them."""
    return all(captured[name] == now[name] for name in _MODEL_INPUTS)
