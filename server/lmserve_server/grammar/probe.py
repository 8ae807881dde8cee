"""``CompileProbe``: a spec compiled first in a child process, so that the grammar library,
native code, can't take the daemon down with it.

A grammar the library can't handle can crash the process that compiles it (3,000 chained Lark
rules overflow its stack: a segmentation fault, no exception). No pre-check of the text can
rule out every such shape, so every spec the daemon has not compiled before goes first to a
child that does the daemon's whole compile (``backend.compile_template``, the same limits) on
a thread with a smaller stack than the daemon's compile threads (``PROBE_STACK_BYTES``), then
walks a few tokens into it. The daemon compiles it only when the child came back alive:

- the child died: the spec is refused, INVALID_ARGUMENT, and a new child is started;
- a compile error: refused with the library's reason (as the daemon's compile would);
- a first few masks over the per-token budget (``--grammar-mask-budget-ms``): refused before
  any row pays for them (``((a{50}){50}){50}``: ~110 ms a token);
- over the compile time limit: the child is killed (a compile in a thread can't be stopped;
  a process can) and the spec refused.

The child also measures the compiled grammar's heap (glibc's ``mallinfo2`` before and after,
the matcher alive), the weight the daemon's cache counts it at (``--grammar-cache-memory``).

One child per compile thread, used by one thread at a time. It imports the library and this
package's ``backend`` only (no torch, no transformers): a few hundred milliseconds to start,
then a round trip of well under a millisecond besides the compile itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from lmserve_server.grammar.backend import (
    GrammarError,
    TokenizerIndex,
    compile_template,
    index_from_json,
    short_reason,
)
from lmserve_server.grammar.heap import heap_bytes
from lmserve_server.grammar.spec import GrammarSpec

# The probe's compile thread's stack: half a default thread's (8 MiB), a quarter of the
# daemon's compile threads' (``compiler.COMPILE_STACK_BYTES``), so a spec that fits here
# fits there with room to spare.
PROBE_STACK_BYTES = 4 * 1024 * 1024
# Tokens the probe walks into a compiled grammar (the lowest allowed token each time): where
# a grammar's first steps blow a library limit ("Too many items") or the mask budget, the
# request is refused before it takes a batch row.
PROBE_STEPS = 4
# The child's scheduling priority, below the daemon's (Unix niceness, 0-19).
PROBE_NICENESS = 10
# A child's start (an interpreter, the library, the tokenizer's index): far above what it
# takes; past it the child is taken for broken.
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ProbeResult:
    """A spec the child compiled and survived: the heap its compiled grammar holds."""

    heap_bytes: int


class ProbeStartError(RuntimeError):
    """The child could not be started (the daemon's fault, not the request's)."""


class CompileProbe:
    """``check(spec, timeout_s, mask_budget_s)`` -> ``ProbeResult``, or ``GrammarError`` with
    a short reason. Starts its child on first use (``start`` does it beforehand), and a new
    one after a crash or a timeout."""

    def __init__(self, index: TokenizerIndex) -> None:
        self._args = (index.tokenizer_json, index.vocab_size, index.end_token_ids)
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: _Pipe | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def check(self, spec: GrammarSpec, timeout_s: float, mask_budget_s: float) -> ProbeResult:
        with self._lock:
            conn = self._ensure_started()
            conn.send((spec.kind, spec.text, mask_budget_s))
            if not conn.poll(timeout_s):
                self._stop()
                raise GrammarError(
                    f"took longer than {timeout_s:g} s to compile "
                    "(--grammar-compile-timeout-s); simplify it"
                )
            try:
                outcome, value = conn.recv()
            except (EOFError, OSError):
                code = self._stop()
                assert code is not None
                raise GrammarError(
                    f"the grammar library crashed compiling it (exit code {code}); "
                    "simplify it (fewer rules, less nesting)"
                ) from None
        if outcome == "error":
            raise GrammarError(value)
        return ProbeResult(heap_bytes=value)

    def _ensure_started(self) -> _Pipe:
        if self._conn is not None and self._process is not None and self._process.poll() is None:
            return self._conn
        self._stop()
        # A fresh interpreter (not a fork of this one: its threads and locks stay here) that
        # talks over its stdin and stdout; its stderr is the daemon's.
        process = subprocess.Popen(
            [sys.executable, "-m", "lmserve_server.grammar.probe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        conn = _Pipe(os.dup(process.stdout.fileno()), os.dup(process.stdin.fileno()))
        process.stdout.close()
        process.stdin.close()
        try:
            conn.send(self._args)
            if not conn.poll(START_TIMEOUT_S):
                raise EOFError
            conn.recv()
        except (EOFError, OSError):
            process.kill()
            process.wait()
            raise ProbeStartError(
                f"the grammar probe process did not start (exit code {process.returncode})"
            ) from None
        self._process, self._conn = process, conn
        return conn

    def _stop(self) -> int | None:
        """Ends the child (if any); its exit code (negative: the signal that ended it)."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        return process.wait()

    def close(self) -> None:
        with self._lock:
            self._stop()


class _Pipe:
    """Pickled messages over a pair of pipes (``multiprocessing``'s framing): a child's
    stdout and stdin seen from the daemon, or the other way round."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        """Takes the two file descriptors over (``close`` closes them)."""
        self._in = Connection(read_fd, writable=False)
        self._out = Connection(write_fd, readable=False)

    def send(self, message: object) -> None:
        self._out.send(message)

    def recv(self) -> Any:
        return self._in.recv()

    def poll(self, timeout_s: float) -> bool:
        return self._in.poll(timeout_s)

    def close(self) -> None:
        self._in.close()
        self._out.close()


# ---- the child ---------------------------------------------------------------------------


def _child_main() -> None:
    """The child's loop: a spec in, ("ok", heap bytes) or ("error", reason) out, until the
    daemon closes the pipe. Its stdout is the pipe, so anything printed goes to stderr."""
    conn = _Pipe(os.dup(0), os.dup(1))
    os.dup2(2, 1)
    tokenizer_json, vocab_size, end_token_ids = conn.recv()
    index = index_from_json(tokenizer_json, vocab_size, end_token_ids)
    conn.send("ready")
    # Started, now below the engine's priority: a costly spec's probe takes the CPU the
    # running requests leave, not theirs (its mask budget counts CPU time, so waiting does
    # not count against it).
    with contextlib.suppress(OSError):
        os.nice(PROBE_NICENESS)
    while True:
        try:
            kind, text, mask_budget_s = conn.recv()
        except (EOFError, OSError):
            return
        spec = GrammarSpec(kind, text)
        reply = _on_small_stack(partial(_probe, index, spec, mask_budget_s))
        conn.send(reply)


def _on_small_stack(work: Callable[[], tuple[str, Any]]) -> tuple[str, Any]:
    """``work()`` on a thread with a ``PROBE_STACK_BYTES`` stack."""
    reply: list[tuple[str, Any]] = []
    previous = threading.stack_size(PROBE_STACK_BYTES)
    try:
        thread = threading.Thread(target=lambda: reply.append(work()))
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    return reply[0] if reply else ("error", "the compile failed unexpectedly")


def _probe(index: TokenizerIndex, spec: GrammarSpec, mask_budget_s: float) -> tuple[str, Any]:
    before = heap_bytes()
    try:
        template = compile_template(index, spec)
    except GrammarError as err:
        return ("error", str(err))
    heap = max(0, heap_bytes() - before)
    matcher = template.deep_copy()
    ends = set(index.end_token_ids)
    for _ in range(PROBE_STEPS):
        started = time.thread_time()
        mask = matcher.compute_bitmask()
        spent = time.thread_time() - started
        if spent > mask_budget_s:
            return ("error", mask_over_budget(spent, mask_budget_s))
        if matcher.is_error():
            return ("error", short_reason(matcher.get_error()))
        token = _lowest_allowed(mask, ends)
        if token is None or not matcher.consume_token(token):
            break
    if matcher.is_error():
        return ("error", short_reason(matcher.get_error()))
    return ("ok", heap)


def mask_over_budget(spent_s: float, budget_s: float) -> str:
    """The reason a grammar is refused, or its row ended, for one token's mask cost."""
    return (
        f"computing the tokens allowed next took {spent_s * 1000:.0f} ms, over the budget of "
        f"{budget_s * 1000:g} ms a token (--grammar-mask-budget-ms); simplify it"
    )


def _lowest_allowed(mask: bytes, ends: set[int]) -> int | None:
    """The lowest token a mask (bit ``t % 8`` of byte ``t // 8``: the int32 words' layout,
    little-endian) allows that is not an end token."""
    for position, byte in enumerate(mask):
        for bit in range(8):
            if byte >> bit & 1 and position * 8 + bit not in ends:
                return position * 8 + bit
    return None


if __name__ == "__main__":
    _child_main()
