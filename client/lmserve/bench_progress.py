"""The live progress bar of ``lmserve-client bench``: done/total, current req/s, errors.

Hand-written (no dependency): one line on stderr, redrawn a few times a second by a task on
the bench's event loop. ``bench`` only makes one when stderr is a terminal, so piped or
redirected runs stay quiet.
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from lmserve.bench_stats import RequestRecord


class Progress:
    """A one-line progress bar on ``out`` (done/total, current req/s, errors), redrawn a few
    times a second; the caller only builds it when ``out`` is a terminal."""

    def __init__(self, out: TextIO, total: int | None, duration_s: float | None) -> None:
        self._out = out
        self._total = total
        self._duration_s = duration_s
        self._ends: list[float] = []
        self._errors = 0
        self._t0 = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._redraw())

    def add(self, record: RequestRecord) -> None:
        self._ends.append(time.perf_counter())
        self._errors += not record.ok

    def line(self, now: float) -> str:
        elapsed = now - self._t0
        window = min(2.0, elapsed)  # req/s over the last 2 s: "current", not the average
        recent = sum(1 for t in reversed(self._ends[-10000:]) if t >= now - window)
        rate = recent / window if window > 0 else 0.0
        done = len(self._ends)
        if self._total is not None:
            fraction = done / self._total if self._total else 1.0
            head = f"{done}/{self._total}"
        else:
            fraction = min(1.0, elapsed / self._duration_s) if self._duration_s else 0.0
            head = f"{done} done"
        if self._duration_s is not None and self._total is not None:
            fraction = max(fraction, min(1.0, elapsed / self._duration_s))
        bar = "#" * int(fraction * 24)
        # \r back to the line's start, \x1b[K clears what a longer previous line left.
        stats = f"{head}  {rate:6.1f} req/s  {self._errors} errors  {elapsed:5.1f} s"
        return f"\r[{bar:<24}] {stats}\x1b[K"

    async def _redraw(self) -> None:
        while True:
            self._out.write(self.line(time.perf_counter()))
            self._out.flush()
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._out.write(self.line(time.perf_counter()) + "\n")
            self._out.flush()
