"""``ContinuousBatch``: the running batch of the continuous scheduler, one step at a time.

Synchronous and single-threaded (the engine thread): ``admit_and_plan`` asks the
``StepPlanner`` what the next step runs, gives the waiting entries it admits a sampling slot
(their settings written into the runner's tables) and the KV cache blocks of their prompts,
``run`` has the ``ModelRunner`` execute it and hands every sampled token to its row,
``retire`` gives back the slots and blocks of the rows that ended. The asyncio side
(``continuous.py``) only queues entries and settles the retired ones.

Memory follows the tokens (``engine/kv_cache.py``): a request is admitted while the pool has
blocks for its whole prompt (and, beside running rows, one more); a decoding row takes a
block each time its next token starts one (``_grow``). When none is left, the most recently
admitted row gives its blocks back and goes first in line (``_preempt``): readmitted, it
computes its prompt and the tokens it had again (a prompt that ends with them, as a row
resumed after a failed static batch does), which gives the tokens it would have got
(sampling is counter-based), and its stream goes on after the last token it sent.

A row's token is handed over in two parts (``Row.take``, cheap: end tokens and limits; then
``Row.settle``: text, stop strings, the stream). ``run`` settles the previous step's tokens
after launching its own step and before waiting for it, so on a GPU that host work runs
while the device computes; a row that a stop string ended there has a token computed for
nothing in this step, which it does not take.

Faults stay with their row: when a step fails, its rows are run again in halves
(``halves.py``; each half one forward: nothing has advanced yet, blocks were taken before
the step, and writing a key again at the same place is harmless), so only a row that fails
alone gets the error; out of memory becomes ``OutOfMemoryError`` (``engine/faults.py``).

With a prefix cache (``engine/prefix_cache.py``, the KV cache's ``prefixes``): a waiting
request's longest cached prefix is looked up before the planner sizes its first chunk
(``_cached_prefix``); admitted, its block table starts with those blocks, shared in place
(the pool counts the tables that hold them), and its prefill starts after them. After each
step, the full blocks a row's prompt has computed so far are kept (``_after_step``), so the
next request with that prefix finds them even while this one still prefills.
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
from lmserve_server.engine.kv_cache import blocks_for
from lmserve_server.engine.prefix_cache import BLOCK, CachedBlock
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
    # Its block table: the pool block of its positions [32 i, 32 i + 32) at i.
    blocks: list[int] = field(default_factory=list)
    # Its prompt's blocks in the prefix cache, in order (the first ones of ``blocks``):
    # those it started from, then those it kept as it computed them.
    cached_blocks: list[CachedBlock] = field(default_factory=list)

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
        """Gives the decoding rows the blocks their next token needs (preempting the most
        recently admitted rows when the pool has too few), admits entries from the left of
        ``waiting`` (popped) as far as the planner, the free rows and the pool's blocks let
        them in; returns the next step's work."""
        cache = self.runner.cache
        pool = cache.pool
        self._grow(waiting)
        running = self.running
        # Each waiting request's prompt and cached prefix, looked up only as far as the
        # planner reads (one past the last it admits), not for the whole queue every step;
        # a request is let in while the pool has blocks for its whole prompt (and, beside
        # running rows, one more to decode into).
        looked_up: list[tuple[tuple[int, ...], list[CachedBlock], int]] = []
        room = [pool.available - (1 if running else 0)]

        def left_to_compute() -> Iterator[int]:
            for entry in islice(waiting, cache.free_slots):
                prompt = (*entry.row.request.prompt_ids, *entry.row.tokens)
                blocks, cached = self._cached_prefix(entry.row, prompt)
                need = self._blocks_needed(prompt, blocks)
                if need > room[0]:
                    return
                room[0] -= need
                looked_up.append((prompt, blocks, cached))
                yield len(prompt) - cached

        plan = self.planner.plan(
            [len(r.prompt) - r.prefilled for r in running], left_to_compute(), cache.free_slots
        )
        now = self._clock()
        admitted: list[tuple[Running[E], int]] = []
        for (prompt, _, _), first_chunk in zip(looked_up, plan.admit, strict=False):
            entry = waiting[0]
            # Again: an earlier admission of this step may have evicted cached blocks.
            blocks, cached = self._cached_prefix(entry.row, prompt)
            pool.share(b.slot for b in blocks)
            table = pool.take(blocks_for(len(prompt)) - len(blocks))
            if table is None:
                pool.release(b.slot for b in blocks)
                break
            slot = cache.allocate()
            assert slot is not None, "the planner admits into free slots only"
            waiting.popleft()
            row = entry.row
            self.runner.sampling.admit(slot, row.request, row.seed, row.tokens)
            new = Running(entry, slot, now, prompt, resumed=len(row.tokens))
            new.blocks = [b.slot for b in blocks] + table
            self._start_after(new, blocks, cached)
            running.append(new)
            admitted.append((new, min(first_chunk, len(prompt) - new.prefilled)))
        work = [self._decode(running[i]) for i in plan.decode]
        work += [self._prefill(running[i], n) for i, n in plan.prefill]
        work += [self._prefill(r, n) for r, n in admitted]
        for w in work:
            w.running.batch_size = max(w.running.batch_size, len(work))
        return work

    def _blocks_needed(self, prompt: Sequence[int], cached: Sequence[CachedBlock]) -> int:
        """The pool blocks a request with ``prompt`` takes at admission: its prompt's
        blocks past the ``cached`` ones, and those of the cached ones no row holds (idle
        blocks count as available until shared)."""
        refs = self.runner.cache.pool.refs
        idle = sum(1 for b in cached if refs[b.slot] == 0)
        return blocks_for(len(prompt)) - len(cached) + idle

    def _grow(self, waiting: deque[E]) -> None:
        """Takes a block for every decoding row whose next token starts one; when the pool
        has none, the most recently admitted row gives its blocks back and goes to the
        front of ``waiting`` (it resumes by computing its prompt and tokens again: the same
        tokens as if it had gone on), until the row has its block or is itself preempted."""
        pool = self.runner.cache.pool
        for running in list(self.running):
            if running not in self.running or running.row.done:
                continue
            if running.prefilled < len(running.prompt):
                continue
            while len(running.blocks) * BLOCK <= self._position(running):
                taken = pool.take(1)
                if taken is not None:
                    running.blocks += taken
                    continue
                victim = self.running[-1]
                self._preempt(victim, waiting)
                if victim is running:
                    break

    def _preempt(self, running: Running[E], waiting: deque[E]) -> None:
        """Gives ``running``'s blocks and slot back; its entry waits first in line."""
        self.running.remove(running)
        self.runner.cache.pool.release(running.blocks)
        running.blocks = []
        self.runner.cache.free(running.slot)
        waiting.appendleft(running.entry)
        self.runner.cache.pool.preempted += 1
        log.debug(
            "preempted a row of %d tokens: the KV cache has no free block",
            len(running.prompt),
        )

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
        """Removes the rows that ended, failed, were aborted or cancelled; gives back their
        slots and blocks. (Their text is settled when their result is read:
        ``Row.output``.)"""
        ended = [r for r in self.running if r.row.done]
        if ended:
            self.running = [r for r in self.running if not r.row.done]
            for running in ended:
                self.runner.cache.free(running.slot)
                self.runner.cache.pool.release(running.blocks)
                running.blocks = []
        return ended

    # ---- a step's parts -----------------------------------------------------------------------

    @staticmethod
    def _position(running: Running[E]) -> int:
        """Where a decoding row's last token goes: after the prompt and what it generated
        since."""
        return len(running.prompt) + running.row.generated - running.resumed - 1

    def _decode(self, running: Running[E]) -> Work[E]:
        row = running.row
        chunk = Chunk(
            running.slot,
            (row.tokens[-1],),
            self._position(running),
            sample=True,
            grammar=row.matcher,
            blocks=tuple(running.blocks),
        )
        return Work(running, chunk)

    def _prefill(self, running: Running[E], n: int) -> Work[E]:
        start = running.prefilled
        last = start + n == len(running.prompt)
        grammar = running.row.matcher if last else None
        tokens = running.prompt[start : start + n]
        chunk = Chunk(running.slot, tokens, start, last, grammar, tuple(running.blocks))
        return Work(running, chunk, prefill=n)

    def _execute(self, work: Sequence[Work[E]]) -> None:
        """Runs ``work`` as one step; when it fails, each half as its own, down to the rows
        that fail alone (their ``error`` is set)."""
        outcomes = run_in_halves(work, self._step, "step")
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
        """An admitted row starts its prefill at ``cached``, its table starting with the
        cached ``blocks``; its sampler sees the tokens it skips (a repetition penalty reads
        the whole prompt) as if a step had. A row that resumes with tokens (preempted, or
        after a failed static batch) was counted, and told its cached prompt tokens, when it
        was first admitted."""
        prefixes = self.runner.cache.prefixes
        if prefixes is None:
            return
        first = not running.resumed
        if first:
            prefixes.count(len(running.prompt), cached)
        if not blocks:
            return
        prefixes.index.touch(blocks)
        running.cached_blocks = list(blocks)
        running.prefilled = cached
        row = running.row
        if first:
            row.cached_prompt_tokens = min(cached, len(row.request.prompt_ids))
        if row.request.sampling.penalised:
            device = self.runner.device
            self.runner.sampling.mark_seen(
                torch.full((cached,), running.slot, dtype=torch.long, device=device),
                torch.tensor(running.prompt[:cached], dtype=torch.long, device=device),
            )

    def _after_step(self, work: Sequence[Work[E]]) -> None:
        """Keeps the full blocks of every prompt the step advanced without an error."""
        prefixes = self.runner.cache.prefixes
        if prefixes is None:
            return
        for w in work:
            running = w.running
            if w.prefill and w.error is None:
                prefixes.store(
                    running.blocks,
                    running.row.request.cache_salt,
                    running.prompt,
                    running.cached_blocks,
                    running.prefilled,
                )
