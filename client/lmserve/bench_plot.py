"""``bench --plot FILE.png``: the latency distribution and the throughput over time.

matplotlib is an optional extra of the client (``pip install 'lmserve[plot]'``), imported
only here and only when a plot is asked for, so the thin client never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmserve.bench_stats import RequestRecord

INSTALL_HINT = "--plot needs matplotlib: pip install 'lmserve[plot]'"


def check_available() -> str | None:
    """None when matplotlib can be imported, else what to install (checked before a run,
    so a long benchmark does not fail only at its end)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def plot_report(report: dict[str, Any], records: Sequence[RequestRecord], path: str | Path) -> None:
    """Writes a two-panel PNG: latency histogram with p50/p99, and req/s and tokens/s per
    second of the run."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the figure only goes to a file
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    latencies = [r.latency_s * 1000.0 for r in records if r.ok]
    if latencies:
        left.hist(latencies, bins=min(50, max(5, len(latencies) // 4)), color="tab:blue")
        stats = report["latency_ms"]
        for name, style in (("p50", "--"), ("p99", ":")):
            label = f"{name} {stats[name]:.0f} ms"
            left.axvline(stats[name], color="black", linestyle=style, label=label)
        left.legend()
    left.set_xlabel("latency (ms)")
    left.set_ylabel("requests")
    left.set_title("latency distribution")

    rows = report["timeline"]
    seconds = [row["t"] for row in rows]
    step: dict[str, Any] = {"where": "post", "marker": "." if len(rows) < 60 else None}
    right.step(seconds, [row["requests_per_s"] for row in rows], color="tab:blue", lw=3, **step)
    right.set_xlabel(f"time since start (s), {report['timeline_bucket_s']:g} s buckets")
    right.set_ylabel("requests/s", color="tab:blue")
    tokens_axis = right.twinx()
    tokens_axis.step(seconds, [row["tokens_per_s"] for row in rows], color="tab:orange", **step)
    tokens_axis.set_ylabel("generated tokens/s", color="tab:orange")
    errors = [row["errors_per_s"] for row in rows]
    if any(errors):
        width = report["timeline_bucket_s"]
        right.bar(seconds, errors, width=width, align="edge", color="tab:red", alpha=0.4)
        right.plot([], [], color="tab:red", alpha=0.4, label="errors/s")
        right.legend(loc="upper left")
    right.set_ylim(bottom=0)
    tokens_axis.set_ylim(bottom=0)
    right.set_title("throughput over time")

    fig.suptitle(f"lmserve bench: {report['load_description']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
