"""``GrammarCompiler``: the daemon's compile service for ``structured_output``.

A request's grammar is compiled before the request is queued, so it waits for it without
holding a batch row, and the compile runs on threads of its own: never on the event loop
(health checks must answer meanwhile) nor on the engine thread (a step must not wait for
someone else's grammar). The library releases the GIL while it compiles.

- Probed first: a spec not in the cache is compiled in a child process before the daemon
  compiles it (``probe``), so a grammar that crashes the library, or whose first masks cost
  more than ``mask_budget_s`` a token, is INVALID_ARGUMENT and the daemon lives on. The
  daemon's compile threads have stacks of ``COMPILE_STACK_BYTES``, four times the probe's.
- Cached by (kind, text), least recently used first out past ``cache_size`` entries or
  ``cache_bytes`` bytes (a compiled grammar weighs the heap the probe saw it take: from a
  hundred kilobytes to megabytes for nested counted repetitions); a bad spec's error is
  cached too (the same mistake sent again is refused at once).
- Requests for a spec being compiled share that compile.
- Time-limited: a probe that outlasts ``timeout_s`` is killed and the spec refused (and that
  refusal cached); a request that waits longer than ``timeout_s`` for its compile is
  INVALID_ARGUMENT naming the field (a late compile's result is still cached).
- The tokenizer's index (a few hundred ms) is built once, on these threads, when the daemon
  starts (``prepare``), and shared by every compiler of the same tokenizer in the process.
  The probes' children start with the first compile (a daemon never asked for structured
  output runs none).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lmserve_server.errors import InvalidArgumentError
from lmserve_server.grammar.backend import (
    GrammarError,
    GrammarUnavailableError,
    TokenizerIndex,
    build_index,
    compile_template,
)
from lmserve_server.grammar.heap import release_free_heap
from lmserve_server.grammar.matcher import CompiledGrammar
from lmserve_server.grammar.probe import CompileProbe, ProbeStartError
from lmserve_server.grammar.spec import GrammarSpec

# Two compile threads: compiles take milliseconds, and on a small host more would only take
# cores from the engine thread.
COMPILE_WORKERS = 2
# The compile threads' stacks: the library recurses through a grammar's rules, and a spec
# passes the probe (``probe.PROBE_STACK_BYTES``, a quarter of this) before it comes here.
# Address space only: the pages a compile never touches cost nothing.
COMPILE_STACK_BYTES = 16 * 1024 * 1024
# What the cache counts a refused spec at, besides its text and message.
_ENTRY_OVERHEAD_BYTES = 1024

# Observers of the compile service (the daemon's metrics): a cold compile's kind and wall
# time, and a cache hit.
OnCompile = Callable[[str, float], None]
OnHit = Callable[[], None]

# By the tokenizer's id, the tokenizer kept alongside so that its id is never reused.
_INDEXES: dict[tuple[int, int, tuple[int, ...]], tuple[Any, TokenizerIndex]] = {}
_INDEXES_LOCK = threading.Lock()


def tokenizer_index(
    hf_tokenizer: Any, model_vocab_size: int, end_token_ids: Collection[int]
) -> TokenizerIndex:
    """The index of ``hf_tokenizer``, built at most once per process (daemons of one engine,
    as in the tests, share it; the tokenizer object outlives them)."""
    key = (id(hf_tokenizer), model_vocab_size, tuple(sorted(end_token_ids)))
    with _INDEXES_LOCK:
        if key not in _INDEXES:
            index = build_index(hf_tokenizer, model_vocab_size, end_token_ids)
            _INDEXES[key] = (hf_tokenizer, index)
        return _INDEXES[key][1]


class GrammarCompiler:
    """``await compile(spec)`` -> ``CompiledGrammar``, or ``InvalidArgumentError`` naming
    the field. Made on the daemon's event loop; ``close()`` stops its threads."""

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        model_vocab_size: int,
        end_token_ids: Collection[int],
        timeout_s: float,
        cache_size: int,
        cache_bytes: int = 1 << 30,
        mask_budget_s: float = 0.02,
        on_compile: OnCompile | None = None,
        on_hit: OnHit | None = None,
        workers: int = COMPILE_WORKERS,
    ) -> None:
        if timeout_s <= 0 or cache_size < 1 or cache_bytes < 1 or mask_budget_s <= 0:
            raise ValueError(
                "a compile timeout > 0, a cache of at least 1 entry and 1 byte, a mask budget > 0"
            )
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.mask_budget_s = mask_budget_s
        self._pool = _pool_with_stacks(workers, COMPILE_STACK_BYTES)
        self._index_args = (hf_tokenizer, model_vocab_size, frozenset(end_token_ids))
        self._index: Future[TokenizerIndex] | None = None
        # One probe (a child process) per compile thread, taken for a compile and put back.
        self._probes: queue.Queue[CompileProbe] = queue.Queue()
        self._workers = workers
        # (kind, text) -> the compiled grammar, or the GrammarError of a bad spec; its weight.
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | GrammarError] = OrderedDict()
        self._weights: dict[tuple[str, str], int] = {}
        self._cached_bytes = 0
        self._compiling: dict[tuple[str, str], Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()  # the cache and the in-flight map, shared with the pool
        self._on_compile = on_compile or (lambda kind, seconds: None)
        self._on_hit = on_hit or (lambda: None)

    def prepare(self) -> None:
        """Starts building the tokenizer's index on the compile threads (returns at once)."""
        self._index_future()

    def _index_future(self) -> Future[TokenizerIndex]:
        with self._lock:
            if self._index is None:
                self._index = self._pool.submit(self._build_index)
            return self._index

    def _build_index(self) -> TokenizerIndex:
        index = tokenizer_index(*self._index_args)
        for _ in range(self._workers):
            self._probes.put(CompileProbe(index))
        return index

    async def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        try:
            index = await asyncio.wrap_future(self._index_future())
        except GrammarUnavailableError as err:
            raise InvalidArgumentError(f"structured_output: {err}") from None
        found = self._lookup(spec, index)
        if isinstance(found, CompiledGrammar):
            return found
        try:
            compiling = asyncio.wrap_future(found)
            # Read even when this request gave up on it (its outcome is cached).
            compiling.add_done_callback(_retrieve)
            waiting = asyncio.shield(compiling)  # a timeout leaves it running
            return await asyncio.wait_for(waiting, self.timeout_s)
        except asyncio.TimeoutError:
            raise InvalidArgumentError(
                f"{spec.field}: took longer than {self.timeout_s:g} s to compile "
                "(--grammar-compile-timeout-s); simplify it"
            ) from None
        except GrammarError as err:
            raise InvalidArgumentError(f"{spec.field}: {err}") from None

    def _lookup(
        self, spec: GrammarSpec, index: TokenizerIndex
    ) -> CompiledGrammar | Future[CompiledGrammar]:
        """The cached grammar (a cached error is raised), else the compile of ``spec``:
        the one in flight, or a new one."""
        with self._lock:
            entry = self._cache.get(spec.key)
            if entry is None:
                future = self._compiling.get(spec.key)
                if future is None:
                    future = self._pool.submit(self._compile, spec, index)
                    self._compiling[spec.key] = future
                return future
            self._cache.move_to_end(spec.key)
        self._on_hit()
        if isinstance(entry, GrammarError):
            raise InvalidArgumentError(f"{spec.field}: {entry}")
        return entry

    def _compile(self, spec: GrammarSpec, index: TokenizerIndex) -> CompiledGrammar:
        """On a compile thread: probes, compiles, then caches the outcome, good or bad."""
        started = time.perf_counter()
        try:
            probe = self._probes.get()
            try:
                heap_bytes = probe.check(spec, self.timeout_s, self.mask_budget_s).heap_bytes
            finally:
                self._probes.put(probe)
            template = compile_template(index, spec)
            compiled = CompiledGrammar(spec, template, index, self.mask_budget_s)
        except GrammarError as err:
            self._finish(spec, err, len(str(err)) + _ENTRY_OVERHEAD_BYTES)
            raise
        except ProbeStartError as err:  # the daemon's trouble, not the spec's: not cached
            self._finish(spec, None, 0)
            raise GrammarUnavailableError(str(err)) from None
        except BaseException:  # unforeseen: not cached, the next request tries again
            self._finish(spec, None, 0)
            raise
        finally:
            self._on_compile(spec.kind, time.perf_counter() - started)
        self._finish(spec, compiled, heap_bytes + _ENTRY_OVERHEAD_BYTES)
        return compiled

    def _finish(
        self, spec: GrammarSpec, entry: CompiledGrammar | GrammarError | None, weight: int
    ) -> None:
        """Out of the in-flight map and into the cache at once: a request in between would
        start the same compile again. Least recently used out first while the cache holds
        more than its entries or bytes (the new entry too, if it alone is over: its
        requests still get it)."""
        evicted = False
        with self._lock:
            self._compiling.pop(spec.key, None)
            if entry is None:
                return
            weight += 2 * len(spec.text)
            self._cache[spec.key] = entry
            self._cache.move_to_end(spec.key)
            self._cached_bytes += weight - self._weights.get(spec.key, 0)
            self._weights[spec.key] = weight
            while self._cache and (
                len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes
            ):
                key, _ = self._cache.popitem(last=False)
                self._cached_bytes -= self._weights.pop(key)
                evicted = True
        if evicted:
            # An evicted grammar's memory is freed once no row uses it (the rows hold
            # the grammar); what is free by now goes back to the system.
            release_free_heap()

    @property
    def cached(self) -> int:
        """Specs in the cache (compiled or refused)."""
        with self._lock:
            return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        """What the cache's entries weigh: the heap of the compiled grammars (as the probe
        measured it), their texts and refusals."""
        with self._lock:
            return self._cached_bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        while not self._probes.empty():
            self._probes.get_nowait().close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _pool_with_stacks(workers: int, stack_bytes: int) -> ThreadPoolExecutor:
    """A pool whose ``workers`` threads all exist now, made with ``stack_bytes`` stacks (the
    pool makes its threads as work comes, each with the stack size of that moment; here every
    one is made at once, behind a barrier, while the size is set)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmserve-grammar")
    everyone = threading.Barrier(workers)
    previous = threading.stack_size(stack_bytes)
    try:
        started = [pool.submit(everyone.wait) for _ in range(workers)]
        for future in started:
            future.result()
    finally:
        threading.stack_size(previous)
    return pool
