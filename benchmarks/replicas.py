"""Throughput with 1, 2 and 3 replicas behind one client-side balanced channel.

    python benchmarks/replicas.py --model models/gpt2-random

Each replica is a real ``lmserve serve`` process; the bundled load tester sends the same
fixed workload through one gRPC channel whose round_robin policy spreads it over every
replica (``ipv4:a,b,c``). On a machine with one accelerator per replica the figure should
grow with the replicas; here they all share the same CPU cores, so it shows what the
balancing costs and whether it spreads the load, not a scaling curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, fixed_specs, headline, load, say

from lmserve.balancing import resolve_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default="bench-results/replicas.json")
    args = parser.parse_args(argv)
    setup = Setup(model=args.model, device=args.device)
    cores = os.cpu_count() or 1
    specs = fixed_specs(args.requests, 32, args.new_tokens)
    results = {}
    for replicas in (1, 2, 3):
        # On a CPU each replica gets its share of the cores (as it would get its own GPU),
        # so that replicas don't fight over them.
        if args.device == "cpu":
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // replicas))
        with ExitStack() as stack:
            addresses = [stack.enter_context(daemon(setup)) for _ in range(replicas)]
            target = resolve_target(addresses)
            load(
                target,
                specs[: args.concurrency],
                requests=args.concurrency,
                concurrency=args.concurrency,
            )  # warm-up
            report = load(
                target, specs, requests=args.requests, concurrency=args.concurrency
            ).report
        results[replicas] = headline(report)
        m = results[replicas]
        say(
            f"{replicas} replica(s): {m['tokens_per_s']:.1f} tok/s, {m['requests_per_s']:.2f} "
            f"req/s, p50 {m['p50_ms']:.0f} ms, p99 {m['p99_ms']:.0f} ms, mean batch "
            f"{m['mean_batch']:.1f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
