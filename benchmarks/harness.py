"""What the benchmarks share: real daemons as subprocesses, the in-process baseline, timing.

A daemon is a real ``lmserve serve`` process on a free port (or the static-batching server
of ``static_server.py``), started and SIGTERMed here. The in-process side is the daemon's
own ``Engine`` (the same ``generate_batch`` code path, minus gRPC and the queue) in this
process. The two never run at the same time: each measurement leg runs alone while the
other side sits idle, and the legs of a comparison are interleaved round by round so slow
spells of a shared machine hit both sides alike.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve.bench import LoadConfig, RunResult, run_bench
from lmserve.bench_workload import ListWorkload, RequestSpec, Workload, prompt_of_length

HERE = Path(__file__).resolve().parent
LEG_TIMEOUT_S = 900.0  # per call; a benchmark leg on a slow CPU can queue for minutes


@dataclass(frozen=True)
class Setup:
    """Where and how the model runs, the same for the daemons and the in-process side."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    daemon_flags: tuple[str, ...] = ()  # more `lmserve serve` flags, for every daemon

    def serve_flags(self) -> list[str]:
        flags = ["--model", self.model, "--device", self.device, "--dtype", self.dtype]
        return [*flags, *self.daemon_flags]


_LIVE: set[subprocess.Popen[str]] = set()  # daemons started and not yet stopped


def stop_all_daemons() -> None:
    """SIGTERMs every daemon still running; for a signal handler, where unwinding the
    stack can't be relied on (an exception raised inside a gRPC callback is swallowed)."""
    for proc in list(_LIVE):
        proc.terminate()


@contextmanager
def daemon(setup: Setup, *flags: str, static: bool = False) -> Iterator[str]:
    """A daemon serving ``setup`` on 127.0.0.1:<free port>; yields its address."""
    entry = [str(HERE / "static_server.py")] if static else ["-m", "lmserve_server.cli"]
    command = [sys.executable, *entry, "serve", *setup.serve_flags(), "--port", "0", *flags]
    proc = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _LIVE.add(proc)
    assert proc.stderr is not None
    tail: collections.deque[str] = collections.deque(maxlen=40)
    address = None
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        tail.append(line)
        match = re.search(r"serving .* on (\S+:\d+)", line)
        if match:
            address = match.group(1)
            break
        if time.monotonic() > deadline:
            break
    if address is None or (static and not any("static batching engine" in t for t in tail)):
        proc.kill()
        _LIVE.discard(proc)
        raise RuntimeError(f"daemon did not start as asked: {' '.join(command)}\n{''.join(tail)}")
    # Keep draining stderr (a log line per batch) so the daemon never blocks on the pipe.
    threading.Thread(target=lambda: tail.extend(proc.stderr or ()), daemon=True).start()
    try:
        yield address
    finally:
        stop_process(proc, grace_s=60)
        _LIVE.discard(proc)


def stop_process(proc: subprocess.Popen[Any], *, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; returns once the process is reaped."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The figures every comparison prints and saves, out of a load-tester report."""
    return {
        "tokens_per_s": report["throughput"]["tokens_per_s"],
        "requests_per_s": report["throughput"]["requests_per_s"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "mean_batch": report["batch_size"]["mean"],
        "seconds": report["duration_s"],
        "tokens": report["generated_tokens"],
    }


class InProcess:
    """The baseline: the daemon's ``Engine`` called directly, text in and text out."""

    def __init__(self, setup: Setup, *, pack_weights: bool = True) -> None:
        from lmserve_server.config import EngineConfig
        from lmserve_server.engine.model import Engine

        config = EngineConfig(
            model=setup.model, device=setup.device, dtype=setup.dtype, pack_weights=pack_weights
        )
        self.engine = Engine.load(config)
        self.engine.warm_up()

    def generate(self, specs: Sequence[RequestSpec]) -> tuple[float, list[tuple[int, ...]]]:
        """One ``generate_batch`` of ``specs``, tokenizing included: seconds, each row's
        new token ids."""
        from lmserve_server.engine.types import GenerationOutput, GenerationRequest

        started = time.perf_counter()
        rows = [
            self.engine.new_row(
                GenerationRequest(tuple(self.engine.tokenize(s.prompt)), s.max_new_tokens)
            )
            for s in specs
        ]
        outputs = self.engine.generate_batch(rows)  # .tolist() inside syncs a GPU
        seconds = time.perf_counter() - started
        return seconds, [o.token_ids if isinstance(o, GenerationOutput) else () for o in outputs]

    def one_by_one(self, specs: Sequence[RequestSpec]) -> tuple[list[float], list[tuple[int, ...]]]:
        """Each spec in a call of its own: the seconds of each call, each row's tokens."""
        times, rows = [], []
        for spec in specs:
            seconds, (row,) = self.generate([spec])
            times.append(seconds)
            rows.append(row)
        return times, rows


def token_count(rows: Sequence[Sequence[int]]) -> int:
    return sum(len(row) for row in rows)


def fixed_specs(count: int, prompt_tokens: int, new_tokens: int) -> list[RequestSpec]:
    """``count`` different prompts of exactly ``prompt_tokens`` GPT-2 tokens each."""
    return [RequestSpec(prompt_of_length(prompt_tokens, seed=i), new_tokens) for i in range(count)]


def load(
    address: str,
    workload: Workload | Sequence[RequestSpec],
    *,
    requests: int,
    concurrency: int = 1,
    rate: float | None = None,
    warmup: int = 0,
    seed: int = 0,
) -> RunResult:
    """One run of the bundled load tester (``lmserve-client bench``) against ``address``."""
    if not isinstance(workload, Workload):
        workload = ListWorkload(list(workload))
    wait_for_quiet()
    config = LoadConfig(
        target=address,
        workload=workload,
        concurrency=concurrency,
        rate=rate,
        requests=requests,
        warmup=warmup,
        timeout_s=LEG_TIMEOUT_S,
        seed=seed,
    )
    result = run_bench(config)
    report = result.report
    if report["aborted"] or report["requests"]["errors"]:
        raise RuntimeError(
            f"bench against {address} failed: {report['aborted'] or report['errors_by_code']}"
        )
    return result


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat (Linux)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


# How often a leg had to wait for the machine to calm down, and how often it never did.
QUIET = {"waited_s": 0.0, "started_busy": 0}


def wait_for_quiet(max_wait_s: float = 30.0, busy_below: float = 0.15) -> None:
    """Waits (up to ``max_wait_s``) until the CPUs are under ``busy_below`` busy over a 1 s
    sample. Between legs every process of ours is idle, so what is busy is someone else's:
    on a shared machine this keeps a leg from starting in the middle of another job. Does
    nothing where /proc/stat is missing."""
    if not os.path.exists("/proc/stat"):
        return
    started = time.monotonic()
    while True:
        busy0, total0 = _cpu_times()
        time.sleep(1.0)
        busy1, total1 = _cpu_times()
        if (busy1 - busy0) / max(1, total1 - total0) < busy_below:
            break
        if time.monotonic() - started >= max_wait_s:
            QUIET["started_busy"] += 1
            break
    QUIET["waited_s"] += time.monotonic() - started - 1.0


def verdict(value: float, target: float, *, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "MISS"


def say(text: str = "") -> None:
    print(text, flush=True)


Row = dict[str, Any]  # one line of the summary: figure, what, value, target, verdict


@dataclass(frozen=True)
class Sizes:
    batch_sizes: tuple[int, ...] = (16, 32)
    prompt_tokens: int = 16
    new_tokens: int = 32
    reps: int = 3
    overhead_pairs: int = 60
    overhead_new_tokens: tuple[int, ...] = (1, 8)
    mixed_prompt_tokens: tuple[int, int] = (8, 128)
    mixed_new_tokens: tuple[int, int] = (8, 64)
    mixed_requests: int = 48
    mixed_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # of the measured capacity
    mixed_rates: tuple[float, ...] = ()  # explicit rates instead of fractions
    scaling_batches: tuple[int, ...] = (1, 8, 32, 64)


QUICK = Sizes(
    batch_sizes=(4, 8),
    new_tokens=8,
    reps=1,
    overhead_pairs=10,
    overhead_new_tokens=(2,),
    mixed_requests=12,
    scaling_batches=(1, 4, 8),
)


def summary_row(
    figure: int,
    what: str,
    value: float,
    target: str,
    ok: bool | None,
    detail: dict[str, Any] | None = None,
) -> Row:
    result = "-" if ok is None else "PASS" if ok else "MISS"
    return {
        "figure": figure,
        "what": what,
        "value": value,
        "target": target,
        "verdict": result,
        "detail": detail or {},
    }
