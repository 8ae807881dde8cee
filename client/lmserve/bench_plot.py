"""``bench --plot FILE.png``: the latency distribution, the time to first token (``--stream``)
and the throughput over time.

Throughput is drawn as a rolling rate: at each point, what completed in the window of
``window_s`` seconds before it. A batching daemon finishes requests in bursts (a batch ends,
its rows all return), so fixed 1 s buckets under a steady load read as mostly zeros with
spikes; the window is made wider than the usual gap between bursts (``rolling_window_s``),
so a steady load draws a steady line and only a real stall reaches zero.

matplotlib is an optional extra of the client (``pip install '.[plot]'``), imported only in
``plot_report`` and only when a plot is asked for, so the thin client never needs it; the
series functions here are pure and tested without it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.bench_stats import RequestRecord, bucket_width, percentile

INSTALL_HINT = "--plot needs matplotlib: pip install '.[plot]' (the lmserve plot extra)"
# Completions closer together than this are one burst (one batch ending).
BURST_S = 0.02
# The window spans this many times the usual (90th percentile) gap between bursts.
GAPS_PER_WINDOW = 2.0
# Points per window width: enough for a smooth line, few enough to draw fast.
POINTS_PER_WINDOW = 10


@dataclass(frozen=True)
class RatePoint:
    """Rates over the window ending at ``t`` (seconds since the start of the run)."""

    t: float
    requests_per_s: float
    tokens_per_s: float
    errors_per_s: float


@dataclass(frozen=True)
class PlotSummary:
    """What ``plot_report`` drew: its panels' titles and the data behind them."""

    panels: list[str]
    window_s: float
    title: str = ""
    throughput: list[RatePoint] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)


def check_available() -> str | None:
    """None when matplotlib can be imported, else what to install (checked before a run,
    so a long benchmark does not fail only at its end)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def rolling_window_s(records: Sequence[RequestRecord], duration_s: float) -> float:
    """The rolling window for ``records``: twice the 90th percentile of the gaps between
    bursts of completions, and at least the report's timeline bucket.

    Twice the usual gap keeps every window of a steady load over at least one burst; the
    percentile, unlike the largest gap, lets a genuine stall still show as a dip.
    """
    floor = bucket_width(duration_s)
    bursts = _burst_times(sorted(r.end for r in records))
    gaps = [b - a for a, b in itertools.pairwise(bursts)]
    if not gaps:
        return floor
    return max(floor, GAPS_PER_WINDOW * percentile(gaps, 90))


def _burst_times(ends: Sequence[float]) -> list[float]:
    bursts: list[float] = []
    for end in ends:
        if not bursts or end - bursts[-1] > BURST_S:
            bursts.append(end)
        else:
            bursts[-1] = end  # a burst ends with its last completion
    return bursts


def rolling_rates(records: Sequence[RequestRecord], window_s: float) -> list[RatePoint]:
    """Completions in the ``window_s`` seconds before each point, as rates, from one window
    after the start (an earlier point would count time before the run) to the last
    completion, ``window_s / POINTS_PER_WINDOW`` apart."""
    if not records or window_s <= 0:
        return []
    ordered = sorted(records, key=lambda r: r.end)
    ends = [r.end for r in ordered]
    # Prefix sums, so each point costs two bisections.
    ok = list(itertools.accumulate((int(r.ok) for r in ordered), initial=0))
    tokens = list(
        itertools.accumulate((r.completion_tokens if r.ok else 0 for r in ordered), initial=0)
    )
    errors = list(itertools.accumulate((int(not r.ok) for r in ordered), initial=0))
    step = window_s / POINTS_PER_WINDOW
    last = ends[-1]
    if last <= window_s:  # a run shorter than one window: one point, at its end
        times = [last]
    else:
        times = [window_s + i * step for i in range(int((last - window_s) / step) + 1)]
        if last - times[-1] > 1e-9:
            times.append(last)
    points: list[RatePoint] = []
    for t in times:
        high = bisect.bisect_right(ends, t)
        low = bisect.bisect_right(ends, t - window_s)
        points.append(
            RatePoint(
                t=round(t, 6),
                requests_per_s=(ok[high] - ok[low]) / window_s,
                tokens_per_s=(tokens[high] - tokens[low]) / window_s,
                errors_per_s=(errors[high] - errors[low]) / window_s,
            )
        )
    return points


def plot_report(
    report: dict[str, Any], records: Sequence[RequestRecord], path: str | Path
) -> PlotSummary:
    """Writes the PNG: the latency histogram with p50/p99, with ``--stream`` the time to
    first token's, and the rolling request and token rates; returns what it drew."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the figure only goes to a file
    import matplotlib.pyplot as plt

    ttft_ms = [r.ttft_s * 1000.0 for r in records if r.ok and r.ttft_s is not None]
    panels = 3 if ttft_ms else 2
    fig = plt.figure(figsize=(6 * panels, 5.5))
    # Histograms span both rows; the last column has requests/s above and tokens/s below
    # on axes of their own: on twin axes over the same time each line scales to its own
    # maximum, and with tokens per request about constant the two lines fell on each other.
    grid = fig.add_gridspec(2, panels)
    titles = ["latency distribution"]
    latencies = [r.latency_s * 1000.0 for r in records if r.ok]
    _histogram(
        fig.add_subplot(grid[:, 0]), latencies, report["latency_ms"], "latency (ms)", titles[0]
    )
    if ttft_ms:
        titles.append("time to first token")
        _histogram(
            fig.add_subplot(grid[:, 1]),
            ttft_ms,
            report["ttft_ms"],
            "time to first token (ms)",
            titles[1],
        )
    window = rolling_window_s(records, report["duration_s"])
    series = rolling_rates(records, window)
    seconds = [p.t for p in series]
    marker = "." if len(series) < 60 else None
    rates = fig.add_subplot(grid[0, -1])
    rates.plot(seconds, [p.requests_per_s for p in series], color="tab:blue", marker=marker)
    rates.set_ylabel("requests/s")
    errors = [p.errors_per_s for p in series]
    if any(errors):
        rates.fill_between(seconds, errors, color="tab:red", alpha=0.3, label="errors/s")
        rates.legend(loc="upper left")
    rates.set_ylim(bottom=0)
    rates.tick_params(labelbottom=False)
    titles.append("throughput over time")
    rates.set_title(titles[-1])
    tokens = fig.add_subplot(grid[1, -1], sharex=rates)
    tokens.plot(seconds, [p.tokens_per_s for p in series], color="tab:orange", marker=marker)
    tokens.set_ylabel("generated tokens/s")
    tokens.set_ylim(bottom=0)
    tokens.set_xlabel(f"time since start (s); rates over a rolling {window:.3g} s window")
    title = plot_title(report)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return PlotSummary(titles, window, title, series, ttft_ms)


def plot_title(report: dict[str, Any]) -> str:
    """What was measured: the model, where and how it was served (from the server's
    ModelInfo, when it answered), the load and the workload."""
    lines = []
    model = report.get("model")
    if model:
        scheduler = model.get("scheduler") or "unknown"
        lines.append(
            f"{model['model']} on {model['device']} ({model['dtype']}), {scheduler} scheduler, "
            f"max batch {model['max_batch_size']}"
        )
    load = report.get("load_description", "")
    workload = report.get("workload_description")
    lines.append(f"lmserve bench: {load}" + (f"; {workload}" if workload else ""))
    return "\n".join(lines)


def _histogram(
    axis: Any, values_ms: list[float], stats: dict[str, float] | None, label: str, title: str
) -> None:
    if values_ms:
        axis.hist(values_ms, bins=min(50, max(5, len(values_ms) // 4)), color="tab:blue")
        if stats is not None:
            for name, style in (("p50", "--"), ("p99", ":")):
                line = f"{name} {stats[name]:.0f} ms"
                axis.axvline(stats[name], color="black", linestyle=style, label=line)
            axis.legend()
    axis.set_xlabel(label)
    axis.set_ylabel("requests")
    axis.set_title(title)
