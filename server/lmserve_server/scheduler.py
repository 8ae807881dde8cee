"""``ContinuousScheduler``: the asyncio face of iteration-level batching.

It has the micro-batcher's interface (``start``, ``submit``, ``queue_depth``, ``busy``,
``close``), so the service and the daemon use either. One thread drives a ``DecodeBatch``:
between two decode steps it admits waiting requests (oldest first, up to
``max_batch_size`` rows and the ``max_batch_tokens`` budget) and hands finished rows back to
their callers on the event loop. Nobody waits for a batch to form or to end: a request joins
at the next step and leaves the step it finishes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from lmserve_server.batcher import Served
from lmserve_server.continuous import DecodeBatch, Row
from lmserve_server.engine import Engine
from lmserve_server.errors import QueueFullError, ShuttingDownError
from lmserve_server.types import GenerationOutput, GenerationRequest, padded_tokens

log = logging.getLogger(__name__)

# (rows in the step, its seconds, tokens it produced, whether it failed)
StepObserver = Callable[[int, float, int, bool], None]


class Scheduler(Protocol):
    """What the service needs of a scheduler: the micro-batcher and this one both fit."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def busy(self) -> bool: ...

    def start(self) -> None: ...

    async def submit(self, request: GenerationRequest) -> Served[GenerationOutput]: ...

    async def close(self, drain: bool = True) -> None: ...


@dataclass(eq=False)
class _Ticket:
    request: GenerationRequest
    future: asyncio.Future[Served[GenerationOutput]]
    arrived: float
    admitted: float = 0.0
    batch_size: int = 0


class ContinuousScheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_queue: int,
        max_batch_tokens: int = 0,
        on_step: StepObserver | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._max_queue = max_queue
        self._max_batch_tokens = max_batch_tokens
        self._on_step = on_step
        self._clock = clock
        self._inbox: deque[_Ticket] = deque()
        self._wake = threading.Condition()
        self._batch = DecodeBatch(engine, max_rows=max_batch_size)
        self._closing = False
        # The decode loop occupies the daemon's engine thread (one thread for all of torch).
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="lmserve-decode")
        self._running: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def busy(self) -> bool:
        return len(self._batch) > 0

    def start(self) -> None:
        if self._running is None:
            self._loop = asyncio.get_running_loop()
            self._running = self._loop.run_in_executor(self._executor, self._run)

    async def submit(self, request: GenerationRequest) -> Served[GenerationOutput]:
        if len(self._inbox) >= self._max_queue:
            depth = len(self._inbox)
            raise QueueFullError(
                f"queue is full: {depth} requests waiting (--max-queue {self._max_queue})"
            )
        if self._closing or self._loop is None:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        ticket = _Ticket(request, self._loop.create_future(), self._clock())
        with self._wake:
            self._inbox.append(ticket)
            self._wake.notify()
        try:
            return await ticket.future
        except asyncio.CancelledError:
            with self._wake:
                if ticket in self._inbox:
                    self._inbox.remove(ticket)  # never admitted, never computed
            if request.control:
                request.control.cancel()  # a running row leaves at the next step
            raise

    async def close(self, drain: bool = True) -> None:
        with self._wake:
            self._closing = True
            if not drain:
                while self._inbox:
                    self._settle(self._inbox.popleft(), ShuttingDownError("dropped unrun"))
            self._wake.notify()
        if self._running is not None:
            await self._running

    # ---- the decode thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not len(self._batch) and not self._closing:
                    self._wake.wait()
                if self._closing and not self._inbox and not len(self._batch):
                    return
                joining = self._take_admissible()
            try:
                self._advance(joining)
            except Exception as err:  # the model failed: fail the rows it held, go on
                log.exception("a decode step failed; failing its %d rows", len(self._batch))
                failed = [r.ticket for r in self._batch.rows] + [r.ticket for r in joining]
                for ticket in {id(t): t for t in failed}.values():
                    self._settle(ticket, err)
                self._batch = DecodeBatch(self._engine, max_rows=self._max_batch_size)
                if self._on_step:
                    self._on_step(len(failed), 0.0, 0, True)

    def _take_admissible(self) -> list[Row]:
        """Oldest first, while rows and the padded-token budget allow. Holds the lock."""
        running = [r.request for r in self._batch.rows]
        joining: list[Row] = []
        while self._inbox and len(running) + len(joining) < self._max_batch_size:
            candidate = self._inbox[0].request
            if (
                self._max_batch_tokens
                and (running or joining)
                and padded_tokens([*running, *(r.request for r in joining), candidate])
                > self._max_batch_tokens
            ):
                break
            ticket = self._inbox.popleft()
            joining.append(Row(request=ticket.request, generator=None, ticket=ticket))
        return joining

    def _advance(self, joining: list[Row]) -> None:
        started = time.perf_counter()
        rows = len(self._batch)
        if joining:
            now = self._clock()
            for row in joining:
                row.ticket.admitted, row.ticket.batch_size = now, rows + len(joining)
        finished = self._batch.step(joining)
        self._batch.drop_cancelled()
        for row in finished:
            ticket = row.ticket
            output = self._batch.finish(row)
            done_at = self._clock()
            self._settle(
                ticket,
                Served(
                    output,
                    ticket.batch_size,
                    ticket.admitted - ticket.arrived,
                    done_at - ticket.admitted,
                ),
            )
        if self._on_step:  # every running row and every joiner made a token
            self._on_step(
                rows + len(joining), time.perf_counter() - started, rows + len(joining), False
            )

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
