"""``ContinuousBatch``: the running batch of the continuous scheduler, one step at a time.

Synchronous and single-threaded (the engine thread): ``admit_and_plan`` asks the
``StepPlanner`` what the next step runs, gives the waiting entries it admits free KV-cache
slots (and writes their sampling settings into the runner's slot tables), ``run`` has the
``ModelRunner`` execute it and hands every sampled token to its row, ``retire`` frees the
slots of the rows that ended. The asyncio side (``continuous.py``) only queues entries and
settles the retired ones.

A row's token is handed over in two parts (``Row.take``, cheap: end tokens and limits; then
``Row.settle``: text, stop strings, the stream). ``run`` settles the previous step's tokens
after launching its own step and before waiting for it, so on a GPU that host work runs
while the device computes; a row that a stop string ended there has a token computed for
nothing in this step, which it does not take.

Faults stay with their row: when a step fails, its rows are run again in halves
(``halves.py``; each half one forward: nothing has advanced yet, and writing a key again at
the same place is harmless), so only a row that fails alone gets the error; out of memory
becomes ``OutOfMemoryError`` (``engine/faults.py``).

With a prefix cache (``engine/prefix_cache.py``, the KV cache's ``prefixes``): a waiting
request's longest cached prefix is looked up before the planner sizes its first chunk
(``_cached_prefix``); admitted, its prefill starts after it, and its first step copies the
cached blocks into its slot before the forward (``_restore_and_step``: again in each half of
a failed step, which is harmless too); the blocks stay pinned until that step is over. After
each step, the full blocks a row's prompt has computed so far are kept (``_after_step``),
so the next request with that prefix finds them even while this one still prefills.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, Protocol, TypeVar

import torch

from lmserve_server.engine.faults import out_of_memory
from lmserve_server.engine.prefix_cache import CachedBlock
from lmserve_server.engine.rows import Row
from lmserve_server.engine.runner import Chunk, ModelRunner, SampledToken
from lmserve_server.scheduling.halves import run_in_halves
from lmserve_server.scheduling.planner import StepPlanner

log = logging.getLogger(__name__)


class Entry(Protocol):
    """What the batch needs of a queued request: its row."""

    @property
    def row(self) -> Row: ...


E = TypeVar("E", bound=Entry)


@dataclass(eq=False)
class Running(Generic[E]):
    """An admitted entry: it holds ``slot`` until its row ends. Its ``prompt`` is its
    request's, followed by the tokens its row had when admitted (a static batch that failed
    runs again in halves, each row continuing after its tokens)."""

    entry: E
    slot: int
    admitted: float
    prompt: tuple[int, ...]
    resumed: int = 0  # tokens the row had when admitted (the end of ``prompt``)
    prefilled: int = 0  # prompt tokens in the cache
    batch_size: int = 0  # the most rows of a step it was in
    # Its prompt's blocks in the prefix cache, in order: those it started from (copied
    # into its slot by its first step: ``restore``), then those it kept as it computed them.
    cached_blocks: list[CachedBlock] = field(default_factory=list)
    restore: tuple[CachedBlock, ...] = ()

    @property
    def row(self) -> Row:
        return self.entry.row


@dataclass(eq=False)
class Work(Generic[E]):
    """One row's part of a step, and its outcome."""

    running: Running[E]
    chunk: Chunk
    prefill: int = 0  # prompt tokens this chunk adds to the cache
    token: SampledToken | None = None
    error: Exception | None = None


# (rows in the step, its seconds, tokens it produced, whether it failed)
StepObserver = Callable[[int, float, int, bool], None]


class ContinuousBatch(Generic[E]):
    def __init__(
        self,
        runner: ModelRunner,
        planner: StepPlanner,
        *,
        on_step: StepObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.planner = planner
        self.running: list[Running[E]] = []
        self._on_step = on_step
        self._clock = clock
        self._unsettled: list[Row] = []  # rows given a token whose text is not followed yet

    def admit_and_plan(self, waiting: deque[E]) -> list[Work[E]]:
        """Admits entries from the left of ``waiting`` (popped) into free slots, as far as
        the planner lets them in; returns the next step's work."""
        cache = self.runner.cache
        running = self.running
        # Each waiting request's prompt and cached prefix, looked up only as far as the
        # planner reads (one past the last it admits), not for the whole queue every step.
        looked_up: list[tuple[tuple[int, ...], list[CachedBlock], int]] = []

        def left_to_compute() -> Iterator[int]:
            for entry in islice(waiting, cache.free_slots):
                prompt = (*entry.row.request.prompt_ids, *entry.row.tokens)
                blocks, cached = self._cached_prefix(entry.row, prompt)
                looked_up.append((prompt, blocks, cached))
                yield len(prompt) - cached

        plan = self.planner.plan(
            [len(r.prompt) - r.prefilled for r in running], left_to_compute(), cache.free_slots
        )
        now = self._clock()
        for prompt, blocks, cached in looked_up[: len(plan.admit)]:
            slot = cache.allocate()
            assert slot is not None, "the planner admits into free slots only"
            entry = waiting.popleft()
            row = entry.row
            self.runner.sampling.admit(slot, row.request, row.seed, row.tokens)
            admitted = Running(entry, slot, now, prompt, resumed=len(row.tokens))
            self._start_after(admitted, blocks, cached)
            running.append(admitted)
        decoding = sorted(plan.decode, key=lambda i: running[i].slot)  # slots 0, 1, ...: a view
        work = [self._decode(running[i]) for i in decoding]
        first_admitted = len(running) - len(plan.admit)
        chunks = plan.prefill + list(enumerate(plan.admit, start=first_admitted))
        work += [self._prefill(running[i], n) for i, n in chunks]
        for w in work:
            w.running.batch_size = max(w.running.batch_size, len(work))
        return work

    def run(self, work: list[Work[E]]) -> None:
        """Executes the step and hands each row its token (or its error); the previous
        step's tokens are settled while the device runs this one."""
        if not work:
            self.settle()
            return
        started = time.perf_counter()
        self._execute(work)
        tokens = 0
        for w in work:
            if w.error is not None:
                w.running.row.abort(w.error)
                continue
            w.running.prefilled += w.prefill
            if w.token is not None:
                tokens += 1
                w.running.row.take(w.token.token, w.token.logprob)
                self._unsettled.append(w.running.row)
        self._after_step(work)
        if self._on_step:
            failed = all(w.error is not None for w in work)
            self._on_step(len(work), time.perf_counter() - started, tokens, failed)

    def settle(self) -> None:
        """Follows the text of every token handed over and not yet settled."""
        rows, self._unsettled = self._unsettled, []
        for row in rows:
            try:
                row.settle()
            except Exception as err:  # e.g. a stream whose event loop is gone
                log.exception("a row failed taking its token")
                row.abort(err)

    def retire(self) -> list[Running[E]]:
        """Removes the rows that ended, failed, were aborted or cancelled; frees their slots.
        (Their text is settled when their result is read: ``Row.output``.)"""
        ended = [r for r in self.running if r.row.done]
        if ended:
            self.running = [r for r in self.running if not r.row.done]
            for running in ended:
                self.runner.cache.free(running.slot)
        return ended

    # ---- a step's parts -----------------------------------------------------------------------

    def _decode(self, running: Running[E]) -> Work[E]:
        row = running.row
        # Where its last token goes: after the prompt and what it generated since.
        position = len(running.prompt) + row.generated - running.resumed - 1
        chunk = Chunk(running.slot, (row.tokens[-1],), position, sample=True, grammar=row.matcher)
        return Work(running, chunk)

    def _prefill(self, running: Running[E], n: int) -> Work[E]:
        start = running.prefilled
        last = start + n == len(running.prompt)
        grammar = running.row.matcher if last else None
        chunk = Chunk(running.slot, running.prompt[start : start + n], start, last, grammar)
        return Work(running, chunk, prefill=n)

    def _execute(self, work: Sequence[Work[E]]) -> None:
        """Runs ``work`` as one step; when it fails, each half as its own, down to the rows
        that fail alone (their ``error`` is set)."""
        outcomes = run_in_halves(work, self._restore_and_step, "step")
        for w, outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, Exception):
                w.error = outcome
            else:
                w.token = outcome

    def _step(self, work: Sequence[Work[E]]) -> list[SampledToken | None]:
        """One step of ``work``, the previous step's tokens settled while it runs; each
        row's new token (None for a prefill chunk that samples nothing)."""
        try:
            launched = self.runner.launch([w.chunk for w in work])
            self.settle()
            tokens = iter(self.runner.collect(launched))
        except torch.OutOfMemoryError as err:
            raise out_of_memory(err, f"in a step of {len(work)} row(s)") from err
        return [next(tokens) if w.chunk.sample else None for w in work]

    # ---- the prefix cache ---------------------------------------------------------------------

    def _cached_prefix(self, row: Row, prompt: tuple[int, ...]) -> tuple[list[CachedBlock], int]:
        """The cached blocks a waiting row's prompt starts from, and the prompt tokens it
        need not compute (``PrefixCache.usable``; none without a cache)."""
        prefixes = self.runner.cache.prefixes
        return ([], 0) if prefixes is None else prefixes.usable(row.request.cache_salt, prompt)

    def _start_after(self, running: Running[E], blocks: list[CachedBlock], cached: int) -> None:
        """An admitted row starts its prefill at ``cached``, after copying ``blocks`` (pinned
        until its first step has copied them into its slot); its sampler sees the tokens it
        skips (a repetition penalty reads the whole prompt) as if a step had."""
        prefixes = self.runner.cache.prefixes
        if prefixes is None:
            return
        prefixes.count(len(running.prompt), cached)
        if not blocks:
            return
        prefixes.index.pin(blocks)
        prefixes.index.touch(blocks)
        running.cached_blocks = list(blocks)
        running.restore = tuple(blocks)
        running.prefilled = cached
        row = running.row
        row.cached_prompt_tokens = min(cached, len(row.request.prompt_ids))
        if row.request.sampling.penalised:
            device = self.runner.device
            self.runner.sampling.mark_seen(
                torch.full((cached,), running.slot, dtype=torch.long, device=device),
                torch.tensor(running.prompt[:cached], dtype=torch.long, device=device),
            )

    def _restore_and_step(self, work: Sequence[Work[E]]) -> list[SampledToken | None]:
        """``_step``, after copying the cached prefixes of rows admitted with one into
        their slots."""
        prefixes = self.runner.cache.prefixes
        for w in work:
            if w.running.restore:
                assert prefixes is not None
                prefixes.restore(self.runner.cache, w.running.slot, w.running.restore)
        return self._step(work)

    def _after_step(self, work: Sequence[Work[E]]) -> None:
        """Unpins the blocks the step copied; keeps the full blocks of every prompt the step
        advanced without an error."""
        prefixes = self.runner.cache.prefixes
        if prefixes is None:
            return
        for w in work:
            running = w.running
            if running.restore:
                prefixes.index.unpin(running.restore)
                running.restore = ()
            if w.prefill and w.error is None:
                prefixes.store(
                    self.runner.cache,
                    running.slot,
                    running.row.request.cache_salt,
                    running.prompt,
                    running.cached_blocks,
                    running.prefilled,
                )
