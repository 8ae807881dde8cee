"""The load generator of ``lmserve-client bench``: one ``AsyncClient``, many requests.

Closed loop: ``concurrency`` workers, each sending its next request as soon as its last one
answered. Open loop: requests start on a seeded Poisson schedule of ``rate`` per second,
however many are in flight, and each one's latency counts from when it was *due*, so a
client that falls behind can't hide the server's queueing (coordinated omission). Either
is bounded by a request count and/or a duration; a warm-up of uncounted requests goes
first. Every call carries a deadline, and a server that can't be reached (checked with one
``GetModelInfo`` first) or that does not implement ``GenerateStream`` ends the run at once
with the reason in the report, so the tool never hangs on a dead server.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lmserve.aio import AsyncClient
from lmserve.bench_progress import Progress
from lmserve.bench_stats import RequestRecord, build_report
from lmserve.bench_workload import Workload, poisson_arrivals
from lmserve.errors import DeadlineExceededError, LmserveError, UnavailableError
from lmserve.types import ModelInfo, Prompt


@dataclass(frozen=True)
class LoadConfig:
    """One bench run. ``rate`` set means open loop, else closed loop with ``concurrency``."""

    target: str
    workload: Workload
    concurrency: int = 8
    rate: float | None = None
    requests: int | None = 100
    duration_s: float | None = None
    warmup: int = 0
    timeout_s: float | None = 60.0
    stream: bool = False
    temperature: float | None = None
    cache_salt: str | None = None  # every request's (the server's prefix cache groups by it)
    seed: int = 0
    progress: bool = False
    connect_timeout_s: float = 10.0
    # More AsyncClient keywords (TLS files, token, channel options), passed through as given.
    client_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("a run needs a bound: requests and/or duration")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")

    def describe_load(self) -> str:
        loop = (
            f"open loop, Poisson {self.rate:g} req/s"
            if self.rate is not None
            else f"closed loop, concurrency {self.concurrency}"
        )
        bounds = [f"{self.requests} requests"] if self.requests is not None else []
        if self.duration_s is not None:
            bounds.append(f"{self.duration_s:g} s")
        extra = f" (+{self.warmup} warm-up)" if self.warmup else ""
        kind = ", streaming" if self.stream else ""
        return f"{loop}, at most {' / '.join(bounds)}{extra}{kind}"


@dataclass
class RunResult:
    """The report (JSON-ready) and the raw records of the measured phase."""

    report: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)


class _Runner:
    def __init__(self, client: AsyncClient, config: LoadConfig) -> None:
        self.client = client
        self.config = config
        self.aborted: str | None = None
        self.max_lag_s = 0.0

    async def one(
        self,
        index: int,
        due: float,
        t0: float,
        sink: list[RequestRecord],
        progress: Progress | None,
    ) -> None:
        """Send request ``index`` (due at ``due``) and append its record to ``sink``."""
        spec = self.config.workload.spec(index)
        record = RequestRecord(index, due - t0)
        self.max_lag_s = max(self.max_lag_s, time.perf_counter() - due)
        kwargs: dict[str, Any] = {
            "temperature": self.config.temperature,
            "cache_salt": self.config.cache_salt,
        }
        kwargs.update(spec.generate_options())
        try:
            if self.config.stream:
                await self._stream(spec.prompt, kwargs, record, due)
            else:
                result = await self.client.generate(spec.prompt, **kwargs)
                record.prompt_tokens = result.prompt_tokens
                record.completion_tokens = result.completion_tokens
                record.batch_size = result.batch_size
                record.queue_ms = result.queue_ms
                record.compute_ms = result.compute_ms
                record.cached_prompt_tokens = result.cached_prompt_tokens
        except LmserveError as err:
            record.error_code, record.error_details = err.code.name, err.details
            if err.code.name == "UNIMPLEMENTED" and self.config.stream:
                self.aborted = (
                    "the server does not implement GenerateStream (UNIMPLEMENTED): "
                    "run without --stream, or against a daemon that streams"
                )
        record.end = time.perf_counter() - t0
        sink.append(record)
        if progress is not None:
            progress.add(record)

    async def _stream(
        self,
        prompt: Prompt,
        kwargs: dict[str, Any],
        record: RequestRecord,
        due: float,
    ) -> None:
        last: float | None = None
        async for chunk in self.client.stream(prompt, **kwargs):
            now = time.perf_counter()
            count = len(chunk.token_ids)
            if count == 0 and not chunk.text:
                continue
            if last is None:
                record.ttft_s = now - due
            else:
                # One entry per token, so a chunk of several tokens weighs as much as they do.
                record.itl_s.extend([(now - last) / max(count, 1)] * max(count, 1))
            last = now
            record.completion_tokens += count
            if chunk.finish_reason is not None:  # the last chunk says how it was served
                record.prompt_tokens = chunk.prompt_tokens
                record.batch_size = chunk.batch_size
                record.queue_ms = chunk.queue_ms
                record.compute_ms = chunk.compute_ms
                record.cached_prompt_tokens = chunk.cached_prompt_tokens

    async def phase(
        self,
        count: int | None,
        deadline: float | None,
        t0: float,
        *,
        concurrency: int,
        rate: float | None = None,
        progress: Progress | None = None,
    ) -> list[RequestRecord]:
        """Requests 0, 1, ... until ``count`` or ``deadline``; closed loop when ``rate`` is
        None. Their times are relative to ``t0``."""
        sink: list[RequestRecord] = []
        if progress is not None:
            progress.start()
        if rate is None:
            indexes = itertools.count()

            async def worker() -> None:
                while self.aborted is None:
                    index = next(indexes)
                    now = time.perf_counter()
                    if (count is not None and index >= count) or (
                        deadline is not None and now >= deadline
                    ):
                        return
                    await self.one(index, now, t0, sink, progress)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks: set[asyncio.Task[None]] = set()
            schedule = poisson_arrivals(rate, random.Random(self.config.seed))
            for index, offset in enumerate(schedule):
                due = t0 + offset
                if (count is not None and index >= count) or (
                    deadline is not None and due >= deadline
                ):
                    break
                if (delay := due - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                if self.aborted is not None:
                    break
                task = asyncio.create_task(self.one(index, due, t0, sink, progress))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        if progress is not None:
            await progress.close()
        return sink

    async def measure(self) -> tuple[list[RequestRecord], float]:
        config = self.config
        progress = (
            Progress(sys.stderr, config.requests, config.duration_s) if config.progress else None
        )
        t0 = time.perf_counter()
        deadline = None if config.duration_s is None else t0 + config.duration_s
        records = await self.phase(
            config.requests,
            deadline,
            t0,
            concurrency=config.concurrency,
            rate=config.rate,
            progress=progress,
        )
        return records, time.perf_counter() - t0


async def _preflight(
    client: AsyncClient, config: LoadConfig
) -> tuple[ModelInfo | None, str | None]:
    """The server's ModelInfo, and why the run can't go on (None when it can)."""
    limit = config.connect_timeout_s
    if config.timeout_s is not None:
        limit = min(limit, config.timeout_s)
    try:
        return await client.model_info(timeout=limit), None
    except (UnavailableError, DeadlineExceededError) as err:
        return None, f"cannot reach {config.target}: {err}"
    except LmserveError:
        return None, None  # a server without GetModelInfo can still be measured


async def run_load(config: LoadConfig) -> RunResult:
    """Run ``config`` against its target; always returns a report (errors included)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client = AsyncClient(config.target, timeout=config.timeout_s, **config.client_options)
    async with client:
        info, aborted = await _preflight(client, config)
        runner = _Runner(client, config)
        warmup: list[RequestRecord] = []
        records: list[RequestRecord] = []
        duration = 0.0
        if aborted is None and config.warmup:
            warm_concurrency = min(config.warmup, config.concurrency)
            # All at once (up to the concurrency), so the server also warms its batch shapes.
            warmup = await runner.phase(
                config.warmup, None, time.perf_counter(), concurrency=warm_concurrency
            )
            aborted = runner.aborted
        if aborted is None:
            records, duration = await runner.measure()
            aborted = runner.aborted
    settings: dict[str, Any] = {
        "target": config.target,
        "started_at": started_at,
        "model": info.to_dict() if info is not None else None,
        "mode": "open" if config.rate is not None else "closed",
        "concurrency": config.concurrency if config.rate is None else None,
        "rate": config.rate,
        "requests_asked": config.requests,
        "duration_asked_s": config.duration_s,
        "warmup": config.warmup,
        "warmup_errors": sum(not r.ok for r in warmup),
        "stream": config.stream,
        "timeout_s": config.timeout_s,
        "seed": config.seed,
        "cache_salt": config.cache_salt,
        "workload": config.workload.describe(),
        "load_description": config.describe_load(),
        "workload_description": _describe_workload(config.workload.describe()),
        "max_send_lag_ms": runner.max_lag_s * 1000.0 if config.rate is not None else None,
    }
    report = build_report(records, duration_s=duration, settings=settings, aborted=aborted)
    return RunResult(report, records)


def _describe_workload(workload: dict[str, Any]) -> str:
    if workload["kind"] == "fixed":
        return f"fixed prompt {workload['prompt']!r}, max_new_tokens {workload['max_new_tokens']}"
    if workload["kind"] == "file":
        return f"{workload['prompts']} prompts from {workload['path']}"
    low, high = workload["prompt_tokens"]
    new_low, new_high = workload["max_new_tokens"]
    return (
        f"mixed: prompts of {low}-{high} tokens, max_new_tokens {new_low}-{new_high}, "
        f"seed {workload['seed']}"
    )
