"""The numbers of ``lmserve-client bench``: per-request records, percentiles, the report.

``build_report`` turns the records of a run into a JSON-ready dict (throughput, latency
and time-to-first-token percentiles, the daemon's own ``queue_ms``/``compute_ms``/
``batch_size`` distributions, errors by gRPC status code, a per-second timeline);
``format_report`` renders that dict as the human-readable table. Both are pure functions,
tested without a server.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did. Times are seconds from the start of the measured phase."""

    index: int
    start: float  # when it was due (open loop) or sent (closed loop)
    end: float = 0.0
    error_code: str | None = None  # gRPC status code name, None when it succeeded
    error_details: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those from the server's prefix cache
    # As the daemon reported them (unary calls only; a stream carries none of these).
    batch_size: int | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    # Streaming only: first chunk after the call started, and the gap per token after it.
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method), so p50 of [1, 2, 3, 4] is 2.5."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float] | None:
    """count, mean, min, p50, p90, p99 and max of ``values`` times ``scale``; None if empty."""
    if not values:
        return None
    scaled = [v * scale for v in values]
    out: dict[str, float] = {"count": len(scaled), "mean": sum(scaled) / len(scaled)}
    out["min"] = min(scaled)
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(scaled, q)
    out["max"] = max(scaled)
    return out


def bucket_width(duration_s: float) -> float:
    """The timeline's bucket: 1 s, or less for runs under 20 s so they still get 20 or
    so points (a 1-2-5 width, so the axis reads well)."""
    if duration_s >= 20:
        return 1.0
    for width in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01):
        if duration_s / width >= 20:
            return width
    return 0.01


def timeline(records: Sequence[RequestRecord], bucket_s: float = 1.0) -> list[dict[str, Any]]:
    """Completions per ``bucket_s`` window of the run, as rates: req/s, generated tokens/s,
    errors/s; ``t`` is the window's start."""
    if not records:
        return []
    buckets = int(max(r.end for r in records) // bucket_s) + 1
    counts = [[0, 0, 0] for _ in range(buckets)]  # ok requests, tokens, errors
    for r in records:
        row = counts[int(max(r.end, 0.0) // bucket_s)]
        if r.ok:
            row[0] += 1
            row[1] += r.completion_tokens
        else:
            row[2] += 1
    return [
        {
            "t": round(i * bucket_s, 6),
            "requests_per_s": ok / bucket_s,
            "tokens_per_s": tokens / bucket_s,
            "errors_per_s": errors / bucket_s,
        }
        for i, (ok, tokens, errors) in enumerate(counts)
    ]


def build_report(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    settings: dict[str, Any],
    aborted: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready report of a run; ``duration_s`` is the measured phase's wall time."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error_code for r in records if not r.ok)
    samples: dict[str, str] = {}
    for r in records:
        if r.error_code is not None:
            samples.setdefault(r.error_code, r.error_details)
    tokens = sum(r.completion_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    batch_sizes = [r.batch_size for r in ok if r.batch_size is not None]
    return {
        **settings,
        "aborted": aborted,
        "duration_s": duration_s,
        "requests": {"sent": len(records), "ok": len(ok), "errors": len(records) - len(ok)},
        "errors_by_code": dict(sorted(errors.items())),
        "error_samples": samples,
        "throughput": {
            "requests_per_s": len(ok) * per_s,
            "tokens_per_s": tokens * per_s,
            "prompt_tokens_per_s": sum(r.prompt_tokens for r in ok) * per_s,
        },
        "generated_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in ok),
        "latency_ms": summarize([r.latency_s for r in ok], 1000.0),
        "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1000.0),
        "itl_ms": summarize([gap for r in ok for gap in r.itl_s], 1000.0),
        "queue_ms": summarize([r.queue_ms for r in ok if r.queue_ms is not None]),
        "compute_ms": summarize([r.compute_ms for r in ok if r.compute_ms is not None]),
        "batch_size": summarize([float(b) for b in batch_sizes]),
        "batch_size_counts": {str(k): v for k, v in sorted(Counter(batch_sizes).items())},
        "completion_tokens": summarize([float(r.completion_tokens) for r in ok]),
        "timeline_bucket_s": bucket_width(duration_s),
        "timeline": timeline(records, bucket_width(duration_s)),
    }


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_report(report: dict[str, Any]) -> str:
    """The report as the human-readable table ``bench`` prints."""
    lines = [f"target        {report['target']}"]
    model = report.get("model")
    if model:
        batching = f"max batch {model['max_batch_size']}"
        if model.get("max_wait_ms") is not None:
            batching += f", max wait {model['max_wait_ms']:g} ms"
        if model.get("scheduler"):
            batching = f"{model['scheduler']} scheduler, {batching}"
        lines.append(
            f"model         {model['model']} on {model['device']} ({model['dtype']}), {batching}"
        )
    lines.append(f"load          {report['load_description']}")
    lines.append(f"workload      {report['workload_description']}")
    if report["aborted"]:
        lines.append(f"ABORTED       {report['aborted']}")
    req = report["requests"]
    lines.append(
        f"requests      {req['ok']} ok, {req['errors']} failed, in {report['duration_s']:.2f} s"
    )
    thr = report["throughput"]
    lines.append(
        f"throughput    {thr['requests_per_s']:.2f} req/s, "
        f"{thr['tokens_per_s']:.1f} generated tokens/s"
    )
    prompt_tokens = report.get("prompt_tokens", 0)
    if prompt_tokens:
        cached = report.get("cached_prompt_tokens", 0)
        lines.append(
            f"prompt        {prompt_tokens} tokens, {cached} from the prefix cache "
            f"({100 * cached / prompt_tokens:.0f}%)"
        )
    rows = [
        ("latency ms", report["latency_ms"]),
        ("ttft ms", report["ttft_ms"]),
        ("itl ms/token", report["itl_ms"]),
        ("queue ms", report["queue_ms"]),
        ("compute ms", report["compute_ms"]),
        ("batch size", report["batch_size"]),
        ("new tokens", report["completion_tokens"]),
    ]
    columns = ("mean", "p50", "p90", "p99", "max")
    if any(stats is not None for _, stats in rows):
        lines.append("")
        lines.append(f"{'':<14}" + "".join(f"{c:>10}" for c in columns))
    for name, stats in rows:
        if stats is not None:
            lines.append(f"{name:<14}" + "".join(f"{_num(stats[c]):>10}" for c in columns))
    if report.get("stream") and report["queue_ms"] is None:
        lines.append("(a stream reports no queue_ms, compute_ms or batch_size)")
    counts = report["batch_size_counts"]
    if counts:
        total = sum(counts.values())
        # Per request, not per batch: "16: 32" means 32 requests ran in batches of 16.
        shown = ", ".join(f"{size}: {n} ({100 * n / total:.0f}%)" for size, n in counts.items())
        lines.append(f"requests by batch size  {shown}")
    for code, n in report["errors_by_code"].items():
        details = report["error_samples"].get(code, "")
        lines.append(f"error         {code} x{n}" + (f": {details}" if details else ""))
    return "\n".join(lines)
