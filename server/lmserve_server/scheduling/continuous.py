"""``ContinuousScheduler``: iteration-level batching, requests join and leave between steps.

The asyncio face of ``ContinuousBatch`` (``continuous_batch.py``): callers queue requests
here and await their results; one loop on the engine thread plans, runs and retires steps of
the batch, admitting queued requests as rows and KV-cache blocks free up. Nobody waits for a
batch to form or to end.

How a request was served (``Served``): ``batch_size`` is the most rows of a step it was in,
``queue_s`` from ``submit`` to its first step, ``compute_s`` from there to its result.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from lmserve_server.engine.model import Engine
from lmserve_server.engine.rows import DeltaSink, Row
from lmserve_server.engine.runner import Capture
from lmserve_server.engine.types import (
    GenerationOutput,
    GenerationRequest,
    KVCacheBlocks,
    PrefixCacheStats,
)
from lmserve_server.errors import ShuttingDownError, shutting_down
from lmserve_server.scheduling.base import STOPPED, Capacity, check_room
from lmserve_server.scheduling.batcher import Served
from lmserve_server.scheduling.continuous_batch import ContinuousBatch, Running, StepObserver
from lmserve_server.scheduling.steps import (
    StepSettings,
    capacity,
    planner,
    prefix_capacity,
    prepare_runner,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Ticket:
    row: Row
    future: asyncio.Future[Served[GenerationOutput]]
    arrived: float


class ContinuousScheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_queue: int,
        max_step_tokens: int,
        kv_cache_tokens: int = 0,
        kv_cache_memory: float = 0.0,
        kv_cache_host_memory: float = 0.0,
        prefix_cache: bool = True,
        prefix_cache_tokens: int = 0,
        step_graphs: Capture | None = None,
        allow_eager_fallback: bool = False,
        on_step: StepObserver | None = None,
        warm_up: bool = False,
        executor: Executor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._max_queue = max_queue
        self._rows = max_batch_size
        self._kv_tokens = capacity(
            engine, max_batch_size, kv_cache_tokens, kv_cache_memory, kv_cache_host_memory
        )
        # The longest request: the model's context, at most the whole KV cache.
        self._max_request_tokens = min(engine.max_context, self._kv_tokens)
        self._settings = StepSettings(
            rows=max_batch_size,
            kv_tokens=self._kv_tokens,
            max_step_tokens=max_step_tokens,
            step_graphs=step_graphs,
            allow_eager_fallback=allow_eager_fallback,
            warm_up=warm_up,
            prefix_cache_tokens=prefix_capacity(prefix_cache, prefix_cache_tokens, self._kv_tokens),
        )
        self._planner = planner(self._settings)  # checks the budget against the rows now
        self._max_step_tokens = max_step_tokens
        self._on_step = on_step
        self._clock = clock
        self._inbox: deque[_Ticket] = deque()
        self._wake = threading.Condition()
        self._closing = False
        # The step loop occupies the daemon's engine thread (one thread for all of torch).
        self._executor = executor
        self._batch: ContinuousBatch[_Ticket] | None = None
        self._loop_done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the asyncio side ---------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def busy(self) -> bool:
        return bool(self._batch and self._batch.running)

    @property
    def capacity(self) -> Capacity:
        return Capacity(
            scheduler="continuous",
            max_request_tokens=self._max_request_tokens,
            kv_cache_tokens=self._kv_tokens,
            max_step_tokens=self._max_step_tokens,
            max_batch_tokens=0,
        )

    @property
    def kv_cache_blocks(self) -> KVCacheBlocks:
        """The KV cache's blocks: all, those rows hold, those free."""
        return self._batch.runner.cache.pool.counts() if self._batch else KVCacheBlocks()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        prefixes = self._batch.runner.cache.prefixes if self._batch else None
        return prefixes.stats() if prefixes is not None else PrefixCacheStats()

    def start(self) -> None:
        if self._loop_done is None:
            self._loop = asyncio.get_running_loop()
            self._loop_done = self._loop.run_in_executor(self._executor, self._run)

    def check_room(self) -> None:
        check_room(len(self._inbox), self._max_queue)

    async def submit(
        self, request: GenerationRequest, on_delta: DeltaSink | None = None
    ) -> Served[GenerationOutput]:
        self.check_room()
        if self._closing or self._loop is None:
            raise shutting_down()
        # The service has checked this already; a caller that builds requests itself
        # (a benchmark, a test) gets the same refusal rather than a row that never fits.
        self.capacity.request_tokens.check(len(request.prompt_ids), request.max_new_tokens)
        row = self._engine.new_row(request, on_delta)
        ticket = _Ticket(row, self._loop.create_future(), self._clock())
        with self._wake:
            self._inbox.append(ticket)
            self._wake.notify()
        try:
            return await ticket.future
        except asyncio.CancelledError:
            with self._wake:
                if ticket in self._inbox:
                    self._inbox.remove(ticket)  # never admitted, never computed
            row.cancel()  # a running row leaves at the next step
            raise

    async def close(self, drain: bool = True) -> None:
        with self._wake:
            self._closing = True
            if not drain:
                while self._inbox:
                    self._settle(self._inbox.popleft(), ShuttingDownError(STOPPED))
                for running in self._batch.running if self._batch else ():
                    running.row.abort(ShuttingDownError(STOPPED))
            self._wake.notify()
        if self._loop_done is not None:
            await self._loop_done

    # ---- the engine thread -------------------------------------------------------------------

    def prepare(self) -> None:
        """Allocates the KV cache and the step buffers, captures the decode steps' graphs
        (``step_graphs``: one per bucket of rows and of columns), and with ``warm_up`` runs
        two short requests through the steps (``steps.py``); call it on the engine thread
        before ``start`` (a cache that does not fit is then a start-up error, not a
        request's)."""
        if self._batch is None:
            runner = prepare_runner(self._engine, self._settings)
            self._batch = ContinuousBatch(
                runner, self._planner, on_step=self._on_step, clock=self._clock
            )

    def _run(self) -> None:
        try:
            self.prepare()
            batch = self._batch
            assert batch is not None
            while True:
                self._settle_retired(batch.retire())
                with self._wake:
                    while not self._inbox and not batch.running and not self._closing:
                        self._wake.wait()
                    if self._closing and not self._inbox and not batch.running:
                        return
                    work = batch.admit_and_plan(self._inbox)
                batch.run(work)
        except BaseException as err:  # a bug: fail everything rather than hang its callers
            log.exception("the continuous scheduler's loop crashed")
            with self._wake:
                self._closing = True
                running = self._batch.running if self._batch else []
                failed = [*self._inbox, *(r.entry for r in running)]
                self._inbox.clear()
            for ticket in failed:
                self._settle(ticket, ShuttingDownError(f"the scheduler stopped: {err!r}"))
            raise

    def _settle_retired(self, ended: list[Running[_Ticket]]) -> None:
        done_at = self._clock()
        for running in ended:
            row = running.row
            if row.cancelled:
                continue  # its caller is gone
            if row.error is not None:
                self._settle(running.entry, row.error)
                continue
            served = Served(
                row.output(),
                running.batch_size,
                running.admitted - running.entry.arrived,
                done_at - running.admitted,
            )
            self._settle(running.entry, served)

    def _settle(self, ticket: _Ticket, outcome: Served[GenerationOutput] | Exception) -> None:
        assert self._loop is not None

        def settle() -> None:
            if ticket.future.done():  # its caller went away
                return
            if isinstance(outcome, Exception):
                ticket.future.set_exception(outcome)
            else:
                ticket.future.set_result(outcome)

        self._loop.call_soon_threadsafe(settle)
