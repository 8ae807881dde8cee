"""MicroBatcher (scheduling/batcher.py) alone, with trivial fake run_batch functions."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from lmserve_server.errors import QueueFullError, ShuttingDownError
from lmserve_server.scheduling.batcher import MicroBatcher, Served


class FakeRun:
    """A fake run_batch: records each batch, can block on ``gate``, returns ``fn(items)``."""

    def __init__(
        self,
        fn: Callable[[list[int]], Sequence[Any]] | None = None,
        *,
        blocked: bool = False,
        duration_s: float = 0.0,
    ) -> None:
        self.batches: list[list[int]] = []
        self.started_at: list[float] = []
        self.gate = asyncio.Event()
        if not blocked:
            self.gate.set()
        self.fn = fn or (lambda items: [i * 10 for i in items])
        self.duration_s = duration_s
        self._changed = asyncio.Event()

    async def __call__(self, items: list[int]) -> Any:
        self.batches.append(list(items))
        self.started_at.append(time.monotonic())
        self._changed.set()
        await self.gate.wait()
        if self.duration_s:
            await asyncio.sleep(self.duration_s)
        return self.fn(items)

    async def wait_batches(self, n: int, timeout: float = 2.0) -> None:
        """Wait until run_batch has been called ``n`` times."""

        async def _wait() -> None:
            while len(self.batches) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)


Factory = Callable[..., MicroBatcher[int, Any]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    """Build and start batchers; on teardown unblock their fakes and close them."""
    made: list[tuple[MicroBatcher[int, Any], FakeRun]] = []

    def factory(run: FakeRun, **kwargs: Any) -> MicroBatcher[int, Any]:
        options: dict[str, Any] = {"max_batch_size": 32, "max_wait_s": 0.05, "max_queue": 1000}
        options.update(kwargs)
        batcher: MicroBatcher[int, Any] = MicroBatcher(run, **options)
        batcher.start()
        made.append((batcher, run))
        return batcher

    yield factory
    for batcher, run in made:
        run.gate.set()
        await asyncio.wait_for(batcher.close(drain=False), 2.0)


def submit_all(batcher: MicroBatcher[int, Any], items: Sequence[int]) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(batcher.submit(i)) for i in items]


async def settle() -> None:
    """Let every ready task run a few steps (no timing involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


# ---- when a batch closes ---------------------------------------------------------------------


async def test_full_batch_closes_at_once(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=4, max_wait_s=10.0)
    t0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*submit_all(batcher, [1, 2, 3, 4])), 2.0)
    assert time.monotonic() - t0 < 0.5
    assert run.batches == [[1, 2, 3, 4]]
    assert [r.value for r in results] == [10, 20, 30, 40]


async def test_partial_batch_closes_max_wait_after_oldest(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=8, max_wait_s=0.05)
    t0 = time.monotonic()
    tasks = submit_all(batcher, [1, 2, 3])
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    waited = run.started_at[0] - t0
    assert 0.045 <= waited < 0.5
    assert run.batches == [[1, 2, 3]]


async def test_deadline_counts_from_the_oldest_item_not_the_newest(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=8, max_wait_s=0.3)
    t0 = time.monotonic()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(batcher.submit(2))
    await asyncio.wait_for(asyncio.gather(first, second), 2.0)
    # Oldest-based: closes at ~0.3 s; newest-based would close at ~0.5 s.
    assert 0.29 <= run.started_at[0] - t0 < 0.45
    assert run.batches == [[1, 2]]


async def test_items_arriving_during_a_run_go_in_one_next_batch(make: Factory) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=32, max_wait_s=0.1)
    first = asyncio.create_task(batcher.submit(0))
    await run.wait_batches(1)
    assert batcher.busy
    later = submit_all(batcher, list(range(1, 11)))
    await settle()
    assert batcher.queue_depth == 10
    await asyncio.sleep(0.2)  # longer than max_wait: the oldest has waited enough already
    assert len(run.batches) == 1  # nothing formed while run_batch was busy
    released = time.monotonic()
    run.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), 2.0)
    assert run.batches == [[0], list(range(1, 11))]  # one batch of 10, no third small one
    assert run.started_at[1] - released < 0.07  # did not wait max_wait (0.1 s) again
    assert [r.batch_size for r in results] == [1] + [10] * 10
    assert not batcher.busy
    assert batcher.queue_depth == 0


async def test_max_batch_size_splits_70_into_32_32_6(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=32, max_wait_s=0.01)
    results = await asyncio.wait_for(asyncio.gather(*submit_all(batcher, list(range(70)))), 2.0)
    assert [len(b) for b in run.batches] == [32, 32, 6]
    assert [i for b in run.batches for i in b] == list(range(70))  # arrival order kept
    assert [r.batch_size for r in results] == [32] * 64 + [6] * 6
    assert [r.value for r in results] == [i * 10 for i in range(70)]


async def test_max_wait_zero_forms_the_batch_immediately(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=32, max_wait_s=0)
    t0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*submit_all(batcher, [1, 2, 3])), 2.0)
    assert time.monotonic() - t0 < 0.2
    assert run.batches == [[1, 2, 3]]  # all were waiting when the loop woke
    assert [r.value for r in results] == [10, 20, 30]
    one = await asyncio.wait_for(batcher.submit(7), 2.0)
    assert one.value == 70 and one.batch_size == 1


# ---- results -----------------------------------------------------------------------------------


async def test_each_caller_gets_its_own_result_and_timings(make: Factory) -> None:
    run = FakeRun(duration_s=0.03)
    batcher = make(run, max_batch_size=8, max_wait_s=0.05)
    results = await asyncio.wait_for(asyncio.gather(*submit_all(batcher, [3, 1, 2])), 2.0)
    assert all(isinstance(r, Served) for r in results)
    assert [r.value for r in results] == [30, 10, 20]
    assert [r.batch_size for r in results] == [3, 3, 3]
    for r in results:
        assert 0.045 <= r.queue_s < 0.5
        assert 0.025 <= r.compute_s < 0.5
    assert len({r.compute_s for r in results}) == 1  # one run_batch call, one compute time


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_clock_is_used_for_deadlines_and_timings(make: Factory) -> None:
    clock = FakeClock(100.0)

    def advance(items: list[int]) -> list[int]:
        clock.now += 2.0
        return items

    run = FakeRun(advance)
    batcher = make(run, max_batch_size=8, max_wait_s=60.0, clock=clock)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.02)
    assert run.batches == [] and batcher.queue_depth == 1
    clock.now = 160.5  # the oldest has now waited 60.5 s by the injected clock
    second = asyncio.create_task(batcher.submit(2))
    r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), 2.0)
    assert run.batches == [[1, 2]]
    assert (r1.queue_s, r2.queue_s) == (60.5, 0.0)
    assert (r1.compute_s, r2.compute_s) == (2.0, 2.0)


async def test_a_failing_batch_is_retried_in_halves_so_only_the_bad_item_fails(
    make: Factory,
) -> None:
    def fn(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("boom")
        return [i * 10 for i in items]

    run = FakeRun(fn)
    batcher = make(run, max_batch_size=4, max_wait_s=0.05)
    got = await asyncio.gather(*submit_all(batcher, [1, 0, 2, 3]), return_exceptions=True)
    assert isinstance(got[1], ValueError) and str(got[1]) == "boom"
    assert [g.value for g in got if isinstance(g, Served)] == [10, 20, 30]
    assert all(g.batch_size == 4 for g in got if isinstance(g, Served))
    # [1,0,2,3] fails; [1,0] fails; [1] ok; [0] fails alone; [2,3] ok.
    assert run.batches == [[1, 0, 2, 3], [1, 0], [1], [0], [2, 3]]
    good = await asyncio.wait_for(batcher.submit(5), 2.0)
    assert good.value == 50


async def test_cost_budget_closes_a_batch_before_it_goes_over(make: Factory) -> None:
    run = FakeRun(blocked=True)
    # Cost: rows x the largest item, like padded tokens.
    batcher = make(
        run,
        max_batch_size=8,
        max_wait_s=0.01,
        batch_cost=lambda items: len(items) * max(items),
        max_batch_cost=30,
    )
    tasks = submit_all(batcher, [1])
    await run.wait_batches(1)
    tasks += submit_all(batcher, [5, 5, 5, 5, 5, 5, 20, 2])
    await settle()
    run.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    # 6 x 5 = 30 fits; a 7th row (20) would cost 140. The oldest always goes in.
    assert run.batches == [[1], [5, 5, 5, 5, 5, 5], [20], [2]]


async def test_exception_elements_fail_single_items(make: Factory) -> None:
    run = FakeRun(lambda items: [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items])
    batcher = make(run, max_batch_size=3, max_wait_s=0.01)
    got = await asyncio.gather(*submit_all(batcher, [2, -1, 3]), return_exceptions=True)
    assert isinstance(got[1], ValueError) and str(got[1]) == "bad -1"
    assert isinstance(got[0], Served) and isinstance(got[2], Served)
    assert (got[0].value, got[2].value) == (20, 30)
    assert got[0].batch_size == 3


async def test_wrong_length_result_fails_the_whole_batch(make: Factory) -> None:
    run = FakeRun(lambda items: items[:-1])
    batcher = make(run, max_batch_size=3, max_wait_s=0.01)
    got = await asyncio.gather(*submit_all(batcher, [1, 2, 3]), return_exceptions=True)
    assert all(isinstance(e, RuntimeError) for e in got)
    assert "returned 2 results for a batch of 3 items" in str(got[0])
    run.fn = lambda items: [i * 10 for i in items]
    assert (await asyncio.wait_for(batcher.submit(4), 2.0)).value == 40  # loop still alive


# ---- admission and cancellation ----------------------------------------------------------------


async def test_queue_full_at_max_queue(make: Factory) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=1, max_wait_s=0.01, max_queue=3)
    tasks = submit_all(batcher, [0])
    await run.wait_batches(1)
    tasks += submit_all(batcher, [1, 2, 3])  # the running one does not count
    await settle()
    assert batcher.queue_depth == 3
    with pytest.raises(QueueFullError) as info:
        await batcher.submit(4)
    assert str(info.value) == "queue is full: 3 requests waiting (--max-queue 3)"
    run.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    assert [r.value for r in results] == [0, 10, 20, 30]
    assert (await asyncio.wait_for(batcher.submit(4), 2.0)).value == 40


async def test_cancelled_waiting_item_never_reaches_run_batch(make: Factory) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=32, max_wait_s=0.01)
    tasks = submit_all(batcher, [0])
    await run.wait_batches(1)
    t1, t2, t3 = submit_all(batcher, [1, 2, 3])
    await settle()
    t2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t2
    assert batcher.queue_depth == 2  # left the queue at once
    run.gate.set()
    results = await asyncio.wait_for(asyncio.gather(tasks[0], t1, t3), 2.0)
    assert run.batches == [[0], [1, 3]]
    assert [r.value for r in results] == [0, 10, 30]


async def test_cancelled_only_item_means_no_batch(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=32, max_wait_s=0.05)
    task = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert run.batches == []
    assert batcher.queue_depth == 0
    assert (await asyncio.wait_for(batcher.submit(2), 2.0)).value == 20


@pytest.mark.parametrize("outcome", ["value", "item_error", "batch_error"])
async def test_cancel_while_running_is_harmless(make: Factory, outcome: str) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def fn(items: list[int]) -> list[Any]:
        if outcome == "batch_error" and 0 in items:
            raise ValueError("batch failed")
        if outcome == "item_error":
            return [ValueError("row failed") if i == 0 else i * 10 for i in items]
        return [i * 10 for i in items]

    run = FakeRun(fn, blocked=True)
    batcher = make(run, max_batch_size=32, max_wait_s=0)
    cancelled = asyncio.create_task(batcher.submit(0))
    await run.wait_batches(1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert batcher.busy
    run.gate.set()
    assert (await asyncio.wait_for(batcher.submit(1), 2.0)).value == 10
    assert run.batches == [[0], [1]]
    gc.collect()
    await settle()
    loop.set_exception_handler(None)
    assert reported == []


async def test_submit_before_start_and_bad_arguments() -> None:
    run = FakeRun()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        run, max_batch_size=2, max_wait_s=0.01, max_queue=10
    )
    with pytest.raises(RuntimeError, match="start"):
        await batcher.submit(1)
    await batcher.close()
    for bad in ({"max_batch_size": 0}, {"max_wait_s": -1.0}, {"max_queue": 0}):
        options: dict[str, Any] = {"max_batch_size": 2, "max_wait_s": 0.0, "max_queue": 1}
        options.update(bad)
        with pytest.raises(ValueError):
            MicroBatcher(run, **options)


# ---- close -------------------------------------------------------------------------------------


async def test_close_drain_runs_everything_accepted(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=2, max_wait_s=10.0)
    tasks = submit_all(batcher, [1, 2, 3, 4, 5])
    await settle()
    t0 = time.monotonic()
    await asyncio.wait_for(batcher.close(drain=True), 2.0)
    assert time.monotonic() - t0 < 0.5  # did not wait out max_wait (10 s)
    assert all(t.done() for t in tasks)
    assert [t.result().value for t in tasks] == [10, 20, 30, 40, 50]
    assert run.batches == [[1, 2], [3, 4], [5]]
    with pytest.raises(ShuttingDownError):
        await batcher.submit(6)
    await asyncio.wait_for(batcher.close(), 1.0)  # idempotent
    assert run.batches == [[1, 2], [3, 4], [5]]


async def test_close_drain_waits_for_the_running_batch(make: Factory) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=1, max_wait_s=10.0)
    tasks = submit_all(batcher, [1, 2])
    await run.wait_batches(1)
    closing = asyncio.create_task(batcher.close(drain=True))
    await settle()
    assert not closing.done()
    with pytest.raises(ShuttingDownError):
        await batcher.submit(3)
    run.gate.set()
    await asyncio.wait_for(closing, 2.0)
    assert [t.result().value for t in tasks] == [10, 20]
    assert run.batches == [[1], [2]]


async def test_close_without_drain_fails_waiting_items(make: Factory) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=1, max_wait_s=0.01)
    running = asyncio.create_task(batcher.submit(0))
    await run.wait_batches(1)
    waiting = submit_all(batcher, [1, 2])
    await settle()
    closing = asyncio.create_task(batcher.close(drain=False))
    got = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1.0)
    assert all(isinstance(e, ShuttingDownError) for e in got)
    assert batcher.queue_depth == 0
    assert not closing.done()  # the running batch is still running
    run.gate.set()
    await asyncio.wait_for(closing, 2.0)
    assert (await running).value == 0  # the running batch finished normally
    assert run.batches == [[0]]
    with pytest.raises(ShuttingDownError):
        await batcher.submit(3)


async def test_a_failing_run_override_fails_its_batch_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(MicroBatcher[int, int]):
        calls = 0

        async def _run(self, items: list[int]) -> list[int | Exception]:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("bug in _run")
            return await super()._run(items)

    batcher = Flaky(FakeRun(), max_batch_size=2, max_wait_s=0.01, max_queue=10)
    batcher.start()
    try:
        got = await asyncio.gather(*submit_all(batcher, [1, 2]), return_exceptions=True)
        assert [str(e) for e in got] == ["bug in _run", "bug in _run"]
        assert not batcher.busy
        assert (await asyncio.wait_for(batcher.submit(3), 2.0)).value == 30
        assert "failed a batch" in caplog.text
    finally:
        await asyncio.wait_for(batcher.close(), 2.0)


async def test_affinity_batches_the_oldest_with_the_closest_when_more_wait_than_fit(
    make: Factory,
) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=3, max_wait_s=0.01, affinity=float)
    tasks = submit_all(batcher, [1])
    await run.wait_batches(1)
    tasks += submit_all(batcher, [50, 90, 10, 52, 88, 49, 8])
    await settle()
    run.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    # The oldest (50) goes first with its two closest; then 90 (now oldest) with 88 and 10
    # (the closest of what is left); then 8. Arrival order inside each batch.
    assert run.batches == [[1], [50, 52, 49], [90, 10, 88], [8]]


async def test_affinity_changes_nothing_while_everything_fits(make: Factory) -> None:
    run = FakeRun(blocked=True)
    batcher = make(run, max_batch_size=8, max_wait_s=0.01, affinity=float)
    tasks = submit_all(batcher, [1])
    await run.wait_batches(1)
    tasks += submit_all(batcher, [50, 90, 10])
    await settle()
    run.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    assert run.batches == [[1], [50, 90, 10]]


async def closed_loop(make: Factory, *, clients: int, late: int, rounds: int) -> list[int]:
    """``clients`` callers that send again as soon as they are answered; ``late`` of them
    start 30 ms after the others, while the first batch runs. Returns the batch sizes."""
    run = FakeRun(duration_s=0.06)
    batcher = make(run, max_batch_size=16, max_wait_s=0.02)

    async def client(first_delay: float) -> None:
        await asyncio.sleep(first_delay)
        for _ in range(rounds):
            await batcher.submit(1)

    await asyncio.gather(
        *(client(0.0) for _ in range(clients - late)), *(client(0.03) for _ in range(late))
    )
    return [len(b) for b in run.batches]


async def test_a_closed_loop_is_not_locked_into_half_size_cohorts(make: Factory) -> None:
    """4 callers start a batch; 8 more arrive while it runs and form the next. Were each
    batch formed from what waits when the engine frees, the two groups would alternate as
    4 + 8 for ever; the batch waits (at most max_wait) for the callers just served instead."""
    sizes = await closed_loop(make, clients=12, late=8, rounds=8)
    assert sizes[:3] == [4, 8, 12], "the groups alternate once, then run as one"
    steady = sizes[2:]
    assert sum(steady) / len(steady) >= 0.9 * 12, sizes


async def test_a_lone_caller_waits_no_longer_than_before(make: Factory) -> None:
    run = FakeRun()
    batcher = make(run, max_batch_size=16, max_wait_s=0.05)
    for _ in range(3):  # each request after the first follows a batch of one
        started = time.monotonic()
        await batcher.submit(1)
        waited = time.monotonic() - started
    # The usual wait for companions (max_wait after it arrived), nothing added after a batch.
    assert waited < 0.05 + 0.04, waited
