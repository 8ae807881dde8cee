"""``GrammarCompiler``: the daemon's compile service for ``structured_output``.

A request's grammar is compiled before the request is queued, so it waits for it without
holding a batch row, and the compile runs on threads of its own: never on the event loop
(health checks must answer meanwhile) nor on the engine thread (a step must not wait for
someone else's grammar). The library releases the GIL while it compiles.

- Cached by (kind, text), least recently used first out past ``cache_size`` entries; a bad
  spec's error is cached too (the same mistake sent again is refused at once).
- Requests for a spec being compiled share that compile.
- Time-limited: a compile that outlasts ``timeout_s`` is INVALID_ARGUMENT naming the field.
  A compile can't be stopped, but none runs long: the library's fuel limits bound its
  work and --max-prompt-chars its text (a 95k-character schema of 1500 properties: ~50 ms
  here); a late compile's result is still cached.
- The tokenizer's index (a few hundred ms) is built once, on these threads, when the daemon
  starts (``prepare``), and shared by every compiler of the same tokenizer in the process.
"""

from __future__ import annotations

import asyncio
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
from lmserve_server.grammar.matcher import CompiledGrammar
from lmserve_server.grammar.spec import GrammarSpec

# Two compile threads: compiles take milliseconds, and on a small host more would only take
# cores from the engine thread.
COMPILE_WORKERS = 2

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
        on_compile: OnCompile | None = None,
        on_hit: OnHit | None = None,
        workers: int = COMPILE_WORKERS,
    ) -> None:
        if timeout_s <= 0 or cache_size < 1:
            raise ValueError("a compile timeout > 0 and a cache of at least 1 entry")
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmserve-grammar")
        self._index_args = (hf_tokenizer, model_vocab_size, frozenset(end_token_ids))
        self._index: Future[TokenizerIndex] | None = None
        # (kind, text) -> the compiled grammar, or the GrammarError of a bad spec.
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | GrammarError] = OrderedDict()
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
                self._index = self._pool.submit(tokenizer_index, *self._index_args)
            return self._index

    async def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        try:
            index = await asyncio.wrap_future(self._index_future())
        except GrammarUnavailableError as err:
            raise InvalidArgumentError(f"structured_output: {err}") from None
        found = self._lookup(spec, index)
        if isinstance(found, CompiledGrammar):
            return found
        try:
            waiting = asyncio.shield(asyncio.wrap_future(found))  # a timeout leaves it running
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
        """On a compile thread: compiles, then caches the outcome, good or bad."""
        started = time.perf_counter()
        try:
            compiled = CompiledGrammar(spec, compile_template(index, spec), index)
        except GrammarError as err:
            self._finish(spec, err)
            raise
        except BaseException:  # unforeseen: not cached, the next request tries again
            self._finish(spec, None)
            raise
        finally:
            self._on_compile(spec.kind, time.perf_counter() - started)
        self._finish(spec, compiled)
        return compiled

    def _finish(self, spec: GrammarSpec, entry: CompiledGrammar | GrammarError | None) -> None:
        """Out of the in-flight map and into the cache at once: a request in between would
        start the same compile again."""
        with self._lock:
            self._compiling.pop(spec.key, None)
            if entry is None:
                return
            self._cache[spec.key] = entry
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    @property
    def cached(self) -> int:
        """Specs in the cache (compiled or refused)."""
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
