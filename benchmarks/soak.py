"""The daemon's resident memory under minutes of mixed load: does it stay flat once warm?

    python benchmarks/soak.py --model models/tiny-gpt2 --minutes 4

Starts a real ``lmserve serve`` (``--scheduler continuous`` and the default flags unless
``--flags`` says otherwise), waits until it is SERVING, warms it with the same workload
(uncounted), reads its RSS ("warm"), then runs the load tester's mixed workload (random
prompt lengths and ``max_new_tokens``, so every step has another shape) for ``--minutes``
while reading the daemon's RSS every ``--every`` seconds. Prints one line per reading and
the ratio last/warm; exits 1 when the ratio is over ``--limit`` (default 1.25).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, say

from lmserve.bench import LoadConfig, run_bench
from lmserve.bench_workload import MixedWorkload


def rss_mb(pid: int) -> float:
    """The process's resident set size in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between readings")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--limit", type=float, default=1.25, help="largest last/warm ratio")
    parser.add_argument(
        "--flags", default="--scheduler continuous", help="more lmserve serve flags, one string"
    )
    parser.add_argument("--json", default=None, help="write the readings here")
    args = parser.parse_args(argv)
    setup = Setup(model=args.model, daemon_flags=tuple(args.flags.split()))
    # The load tester's --mixed defaults: prompts of 8-128 tokens, 8-64 new tokens.
    workload = MixedWorkload(prompt_tokens=(8, 128), new_tokens=(8, 64), seed=0)
    with daemon(setup) as address:
        pid = _pid_of()
        serving = rss_mb(pid)
        say(f"SERVING: {serving:.0f} MB")
        warm_up = LoadConfig(
            target=address, workload=workload, concurrency=args.concurrency, requests=64
        )
        run_bench(warm_up)
        warm = rss_mb(pid)
        say(f"warm: {warm:.0f} MB (pid {pid}, {args.flags})")
        readings: list[tuple[float, float]] = []
        load = LoadConfig(
            target=address,
            workload=workload,
            concurrency=args.concurrency,
            seed=1,
            duration_s=args.minutes * 60.0,
            requests=None,
            warmup=0,
        )
        result: dict[str, object] = {}
        runner = threading.Thread(
            target=lambda: result.setdefault("run", run_bench(load)), daemon=True
        )
        started = time.monotonic()
        runner.start()
        while runner.is_alive():
            runner.join(args.every)
            seconds = time.monotonic() - started
            readings.append((seconds, rss_mb(pid)))
            say(f"{seconds:6.0f} s: {readings[-1][1]:.0f} MB")
        run = result["run"]
        report = run.report  # type: ignore[attr-defined]
    last = readings[-1][1]
    ratio = last / warm
    ok, errors = report["requests"]["ok"], report["requests"]["errors"]
    say(
        f"warm {warm:.0f} MB, after {readings[-1][0]:.0f} s {last:.0f} MB: x{ratio:.2f} "
        f"(limit x{args.limit}); {ok} requests, {errors} errors"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "flags": args.flags,
                    "serving_mb": serving,
                    "warm_mb": warm,
                    "readings": readings,
                    "requests": report["requests"],
                },
                indent=2,
            )
        )
    return 0 if ratio <= args.limit and not errors else 1


def _pid_of() -> int:
    """The pid of the one daemon the harness started (it keeps the Popen)."""
    import harness

    (proc,) = (p for p in harness._LIVE if p.poll() is None)
    return proc.pid


if __name__ == "__main__":
    sys.exit(main())
