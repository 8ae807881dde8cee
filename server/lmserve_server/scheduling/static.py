"""``StaticScheduler``: the micro-batcher in front of one engine call per batch.

The ``MicroBatcher`` (``batcher.py``) decides when a batch runs and what it holds; here its
items are the requests' rows (``engine/rows.py``) and a batch runs on the engine thread, by
one of two engines (``--static-engine``):

- ``generate`` (a CPU's default): ``Engine.generate_batch``, one ``generate`` left-padded
  with EOS;
- ``steps`` (a GPU's default): the continuous runner's steps, the batch run to its end
  (``steps.py``): packed rather than padded, over decode steps captured as CUDA graphs once
  at start-up (transformers' ``generate`` runs its decode steps eagerly, a few hundred
  kernel launches each, unless compiled per batch size and cache length, minutes of
  compilation per shape before serving).

Either way a row's tokens are the same (tested). When a batch fails, the batcher retries
its halves; each row keeps the tokens it made before the failure and continues after them,
so its stream never repeats.

How a request was served (``Served``): ``batch_size`` is the rows of its batch (every step of
a ``generate`` runs them all), ``queue_s`` from ``submit`` to the start of its batch,
``compute_s`` the wall time of that batch's ``generate`` (its retries included).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from lmserve_server.engine.model import Engine
from lmserve_server.engine.rows import DeltaSink, Row
from lmserve_server.engine.runner import ModelRunner
from lmserve_server.engine.types import (
    GenerationOutput,
    GenerationRequest,
    KVCacheBlocks,
    PrefixCacheStats,
)
from lmserve_server.errors import ShuttingDownError
from lmserve_server.scheduling.base import STOPPED, Capacity, check_room
from lmserve_server.scheduling.batcher import MicroBatcher, Served
from lmserve_server.scheduling.steps import StepSettings, planner, prepare_runner, run_to_end

# (rows, seconds, outcomes or None when the batch raised)
BatchObserver = Callable[[int, float, "list[GenerationOutput | Exception] | None"], None]


def affinity(row: Row) -> float:
    """Rows with close values waste little on each other in one batch: every row computes
    until the batch's longest finishes, and pads to its longest prompt."""
    request = row.request
    return request.max_new_tokens + 0.25 * len(request.prompt_ids)


def padded_tokens(batch: Sequence[Row]) -> int:
    """What a batch costs in memory: every row is padded to the longest prompt and runs (in
    the worst case) to the largest max_new_tokens."""
    longest = max(len(r.request.prompt_ids) for r in batch)
    return len(batch) * (longest + max(r.request.max_new_tokens for r in batch))


class StaticScheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        max_batch_tokens: int = 0,
        group_similar: bool = True,
        on_batch: BatchObserver | None = None,
        warm_up: bool = False,
        steps: StepSettings | None = None,
        executor: Executor,
    ) -> None:
        self._engine = engine
        self._warm_up = warm_up
        self._steps = steps  # None: generate
        self._runner: ModelRunner | None = None
        self._executor = executor
        self._max_queue = max_queue
        self._max_batch_tokens = max_batch_tokens
        self._on_batch = on_batch
        self._running: list[Row] = []
        self._batcher: MicroBatcher[Row, GenerationOutput] = MicroBatcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            batch_cost=padded_tokens,
            max_batch_cost=max_batch_tokens or None,
            affinity=affinity if group_similar else None,
        )

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    @property
    def busy(self) -> bool:
        return self._batcher.busy

    @property
    def capacity(self) -> Capacity:
        steps = self._steps
        longest = self._engine.max_context
        if steps is not None:
            longest = min(longest, steps.kv_tokens)
        return Capacity(
            scheduler="static",
            max_request_tokens=min(longest, self._max_batch_tokens or longest),
            kv_cache_tokens=steps.kv_tokens if steps is not None else 0,
            max_step_tokens=steps.max_step_tokens if steps is not None else 0,
            max_batch_tokens=self._max_batch_tokens,
        )

    @property
    def kv_cache_blocks(self) -> KVCacheBlocks:
        """The steps engine's KV cache (``generate`` makes a cache per batch: none here)."""
        if self._runner is None:
            return KVCacheBlocks()
        return self._runner.cache.pool.counts()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The steps engine's prefix cache (``generate`` keeps none: each batch computes its
        prompts whole)."""
        prefixes = self._runner.cache.prefixes if self._runner is not None else None
        return prefixes.stats() if prefixes is not None else PrefixCacheStats()

    def prepare(self) -> None:
        """With ``steps``: the runner (``steps.py``: its KV cache, graphs and warm-up).
        Else nothing to allocate ahead (``generate`` makes its own cache per batch); with
        ``warm_up``, one small batch runs first."""
        if self._steps is not None:
            if self._runner is None:
                self._runner = prepare_runner(self._engine, self._steps)
        elif self._warm_up:
            self._engine.warm_up()

    def _run_rows(self, rows: list[Row]) -> list[GenerationOutput | Exception]:
        """One batch on the engine thread, by the chosen engine."""
        if self._steps is None:
            return self._engine.generate_batch(rows)
        assert self._runner is not None, "prepare() runs before serving"
        return run_to_end(self._runner, planner(self._steps), rows)

    def start(self) -> None:
        self._batcher.start()

    def check_room(self) -> None:
        check_room(self._batcher.queue_depth, self._max_queue)

    async def submit(
        self, request: GenerationRequest, on_delta: DeltaSink | None = None
    ) -> Served[GenerationOutput]:
        row = self._engine.new_row(request, on_delta)  # the batcher checks the queue's bound
        try:
            return await self._batcher.submit(row)
        except asyncio.CancelledError:
            row.cancel()  # a running row is marked finished at the next decode step
            raise

    async def close(self, drain: bool = True) -> None:
        if not drain:
            for row in self._running:
                row.abort(ShuttingDownError(STOPPED))
        await self._batcher.close(drain=drain)

    async def _run_batch(self, rows: list[Row]) -> list[GenerationOutput | Exception]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outcomes: list[GenerationOutput | Exception] | None = None
        self._running = rows
        try:
            outcomes = await loop.run_in_executor(self._executor, self._run_rows, rows)
            return outcomes
        finally:
            self._running = []
            if self._on_batch:
                self._on_batch(len(rows), time.perf_counter() - started, outcomes)
