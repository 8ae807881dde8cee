"""Dynamic micro-batching: many concurrent ``submit(item)``, one ``run_batch(items)`` at a time.

``MicroBatcher`` knows nothing of models or gRPC. Callers ``await submit(item)``; one loop task
forms batches and awaits ``run_batch`` on them, one batch at a time, and hands each caller its
own result. A batch is formed only when ``run_batch`` is free: everything that arrived while the
previous batch ran goes in at once (up to ``max_batch_size``); if fewer are waiting, the loop
waits until ``max_wait_s`` after the *oldest* waiting item arrived, or until the batch fills.
Each batch is built around the oldest waiting item, so nothing starves. With a
``batch_cost`` and ``max_batch_cost`` (e.g. padded tokens), a batch also closes when the next
waiting item would take it over budget.
With an ``affinity`` (a number per item), when more items wait than fit, the batch takes the
oldest and those closest to it, so alike requests share batches; the oldest always goes, so
nothing waits for ever.
When ``run_batch`` raises, the batch is split in halves and each half retried, so only an item
that fails on its own gets the error.

Full batches under a closed loop: callers whose batch just ended usually send again at once.
Were the next batch formed the moment the engine frees, from whatever waits then, callers
that arrived during the last batch would go without the ones just served, and the two groups
would alternate for ever in half-size batches (64 clients as 16 + 48, seen on a GPU). So the
loop counts the items that arrive within ``max_wait_s`` of the engine freeing, and the next
time it frees with fewer items waiting than fit, it waits (at most ``max_wait_s``) until as
many have arrived again; then, or once the batch is full, it runs at once. Traffic that does
not come back (an open loop) is counted as such, and is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lmserve_server.errors import ShuttingDownError, queue_full, shutting_down
from lmserve_server.scheduling.halves import run_in_halves_async

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served(Generic[R]):
    """One submitter's result, with how its batch went."""

    value: R  # what run_batch returned for this item
    batch_size: int  # rows in the batch it ran in
    queue_s: float  # from submit() to the start of its batch's run
    compute_s: float  # wall time of its batch's run_batch call


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    arrived: float
    future: asyncio.Future[Served[R]]
    queued: bool = field(default=True)


class MicroBatcher(Generic[T, R]):
    """Collects concurrent ``submit()`` calls into batches for ``run_batch``; see the module doc."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        batch_cost: Callable[[Sequence[T]], int] | None = None,
        max_batch_cost: int | None = None,
        affinity: Callable[[T], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._batch_cost = batch_cost
        self._max_batch_cost = max_batch_cost if batch_cost is not None else None
        self._affinity = affinity
        self._clock = clock
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup = asyncio.Event()  # set on every change the loop must look at
        self._busy = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # When the engine last freed; how many items arrived within max_wait of it then
        # (counting) and the time before (expected back, in a closed loop).
        self._freed_at = float("-inf")
        self._arrived_after_free = 0
        self._expected_after_free = 0

    def start(self) -> None:
        """Start the batching loop on the running event loop (a second call does nothing)."""
        if self._closing:
            raise RuntimeError("MicroBatcher.start() after close()")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="lmserve-micro-batcher"
            )

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting those in the running batch)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a ``run_batch`` call is running now."""
        return self._busy

    async def submit(self, item: T) -> Served[R]:
        """Queue ``item``, wait for its batch to run, and return its own result.

        Raises ``QueueFullError`` at once when ``max_queue`` items are waiting,
        ``ShuttingDownError`` once ``close()`` has begun, and whatever ``run_batch`` raised
        (or returned as this item's ``Exception``). Cancelling the caller while the item is
        still waiting takes it out of the queue; cancelling it later just drops the result.
        """
        if (depth := len(self._queue)) >= self._max_queue:
            raise queue_full(depth, self._max_queue)
        if self._closing:
            raise shutting_down()
        if self._task is None:
            raise RuntimeError("MicroBatcher.submit() before start()")
        future: asyncio.Future[Served[R]] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, self._clock(), future)
        if pending.arrived - self._freed_at <= self._max_wait_s:
            self._arrived_after_free += 1
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            if pending.queued:
                self._queue.remove(pending)
                self._unqueue(pending)
                self._wakeup.set()  # the oldest item, hence the deadline, may have changed
            raise

    async def close(self, drain: bool = True) -> None:
        """Accept no new items, then wait for the loop to end (idempotent).

        ``drain=True`` still runs everything already accepted, without waiting ``max_wait_s``.
        ``drain=False`` fails waiting items with ``ShuttingDownError``; a running batch finishes.
        Cancelling ``close()`` (e.g. a drain timeout) leaves the loop running; call
        ``close(drain=False)`` afterwards to cut it short.
        """
        self._closing = True
        if not drain:
            self._fail_waiting(
                ShuttingDownError("the server is shutting down; the request was dropped unrun")
            )
        self._wakeup.set()
        if self._task is not None and self._task is not asyncio.current_task():
            await asyncio.wait([self._task])

    # ---- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while (batch := await self._next_batch()) is not None:
                try:
                    await self._execute(batch)
                except Exception as exc:  # a bug: fail this batch, keep the loop
                    logger.exception("the micro-batching loop failed a batch")
                    self._fail(batch, exc)
                except BaseException:  # e.g. the loop task was cancelled: fail it, then stop
                    self._fail(batch, ShuttingDownError("the batch was interrupted"))
                    raise
        except Exception:
            logger.exception("the micro-batching loop crashed; failing the queued requests")
        finally:
            self._closing = True
            self._fail_waiting(ShuttingDownError("the batching loop has stopped"))

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Wait until a batch is due and take it off the queue; None once closed and empty."""
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return None
                await self._wakeup.wait()
                continue
            oldest = self._queue[0]
            candidates = self._candidates()
            if self._closing or len(candidates) < len(self._queue):
                return self._take(candidates)  # full: by size, or the next one is over budget
            if len(candidates) >= self._max_batch_size:
                return self._take(candidates)
            due = oldest.arrived + self._max_wait_s
            if self._awaiting_return(len(candidates)):
                due = max(due, self._freed_at + self._max_wait_s)
            remaining = due - self._clock()
            if remaining <= 0:
                return self._take(candidates)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)

    def _awaiting_return(self, waiting: int) -> bool:
        """Whether callers are likely still on their way back after the engine freed: fewer
        have arrived since than did the time before (see the module doc)."""
        return (
            self._arrived_after_free < self._expected_after_free and waiting < self._max_batch_size
        )

    def _candidates(self) -> list[_Pending[T, R]]:
        """The next batch: waiting items in arrival order, up to the size limit
        and the cost budget. The oldest always goes in, whatever its cost."""
        batch: list[_Pending[T, R]] = []
        for pending in self._in_affinity_order():
            if len(batch) == self._max_batch_size:
                break
            if batch and self._max_batch_cost is not None and self._batch_cost is not None:
                items = [p.item for p in batch] + [pending.item]
                if self._batch_cost(items) > self._max_batch_cost:
                    break
            batch.append(pending)
        if self._affinity is not None:  # back to arrival order
            position = {id(p): i for i, p in enumerate(self._queue)}
            batch.sort(key=lambda p: position[id(p)])
        return batch

    def _in_affinity_order(self) -> list[_Pending[T, R]]:
        """Waiting items: the oldest first, then (with an ``affinity``) the
        others closest to it, so rows that would pad each other least share a batch; without
        one, or while they all fit anyway, in arrival order."""
        same = list(self._queue)
        if self._affinity is None or len(same) <= self._max_batch_size:
            return same
        anchor = self._affinity(same[0].item)
        rest = sorted(same[1:], key=lambda p: abs(self._affinity(p.item) - anchor))  # type: ignore[misc]
        return [same[0], *rest]

    def _take(self, batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        """Remove ``batch`` from the queue, keeping the order of what stays."""
        taken = set(map(id, batch))
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        for pending in batch:
            self._unqueue(pending)
        return batch

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        """Run one batch and settle each of its futures."""
        self._busy = True
        start = self._clock()
        try:
            outcomes = await self._run([pending.item for pending in batch])
        finally:
            self._busy = False
            self._freed_at = self._clock()
            self._expected_after_free, self._arrived_after_free = self._arrived_after_free, 0
        compute_s = self._clock() - start
        outcomes = _aligned(outcomes, len(batch), "_run")
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._settle(pending.future, outcome)
            elif not pending.future.done():  # done: its caller was cancelled
                served = Served(outcome, len(batch), start - pending.arrived, compute_s)
                pending.future.set_result(served)

    async def _run(self, items: list[T]) -> list[R | Exception]:
        """One outcome per item. When run_batch raises, the halves are retried
        (``halves.py``), so one bad item (or one that runs out of memory in company) fails
        alone."""

        async def run(group: Sequence[T]) -> Sequence[R | Exception]:
            return _aligned(list(await self._run_batch(list(group))), len(group), "run_batch")

        return await run_in_halves_async(items, run, "batch")

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _unqueue(pending: _Pending[T, R]) -> None:
        pending.queued = False

    def _fail_waiting(self, error: Exception) -> None:
        while self._queue:
            pending = self._queue.popleft()
            self._unqueue(pending)
            self._settle(pending.future, error)

    def _fail(self, batch: list[_Pending[T, R]], error: Exception) -> None:
        for pending in batch:
            self._settle(pending.future, error)

    @staticmethod
    def _settle(future: asyncio.Future[Served[R]], error: Exception) -> None:
        if not future.done():
            future.set_exception(error)


def _aligned(results: list[R | Exception], n: int, name: str) -> list[R | Exception]:
    """``results`` if it has one entry per item, else a RuntimeError for every item."""
    if len(results) == n:
        return results
    error = RuntimeError(
        f"{name} returned {len(results)} results for a batch of {n} items; expected {n}"
    )
    return [error] * n
