"""bfloat16 against float32 on a CPU, side by side: the daemon's resident memory, a decode
step's time and a short concurrent load's throughput.

    python benchmarks/cpu_dtype.py --model models/gpt2-random [--rounds 3]

Each round starts a real ``lmserve serve`` per leg (``--legs``), in a rotating order so that
slow spells of a shared machine hit every leg alike: ``float32`` (the CPU's default, weights
packed for oneDNN), ``float32-unpacked`` (``--pack-weights false``) and ``bfloat16``
(packing is for float32 alone, so none). For each it reads the RSS once SERVING, times one
streamed request alone three times (``--new-tokens`` tokens after a ``--prompt-tokens``
prompt; a decode step is the time between its first and last token over the tokens
between; the median of the three), with ``--requests`` runs that many requests
``--concurrency`` at a time (tokens/s), and reads the RSS again (warm). Prints each round,
then the medians and their ratios to the first leg.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import Setup, daemon, fixed_specs, say

from lmserve import Client
from lmserve.bench import LoadConfig, run_bench
from lmserve.bench_workload import ListWorkload, prompt_of_length

LEGS: dict[str, tuple[str, ...]] = {
    "float32": ("--dtype", "float32"),
    "float32-unpacked": ("--dtype", "float32", "--pack-weights", "false"),
    "bfloat16": ("--dtype", "bfloat16"),
}


def rss_mb(pid: int) -> float:
    """The process's resident set size in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def daemon_pid() -> int:
    """The pid of the one daemon the harness runs now."""
    (proc,) = (p for p in harness._LIVE if p.poll() is None)
    return proc.pid


def decode_step_ms(address: str, prompt_tokens: int, new_tokens: int) -> float:
    """One streamed request alone: the time per token between its first and its last."""
    arrivals: list[float] = []
    with Client(address, timeout=600) as client:
        for chunk in client.stream(
            prompt_of_length(prompt_tokens, seed=99), max_new_tokens=new_tokens
        ):
            arrivals.extend([time.perf_counter()] * len(chunk.token_ids))
    return 1000 * (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)


def measure(model: str, flags: tuple[str, ...], args: argparse.Namespace) -> dict[str, float]:
    setup = Setup(model=model, daemon_flags=(*args.flags.split(), *flags))
    with daemon(setup) as address:
        pid = daemon_pid()
        serving = rss_mb(pid)
        step = statistics.median(
            decode_step_ms(address, args.prompt_tokens, args.new_tokens) for _ in range(3)
        )
        figures = {"serving_mb": serving, "step_ms": step, "tokens_per_s": 0.0}
        if args.requests:
            figures["tokens_per_s"] = short_load(address, args)
        figures["warm_mb"] = rss_mb(pid)
        return figures


def short_load(address: str, args: argparse.Namespace) -> float:
    """Tokens/s of ``--requests`` requests, ``--concurrency`` at a time."""
    workload = ListWorkload(fixed_specs(args.requests, args.prompt_tokens, args.new_tokens))
    # Not harness.load: its wait for idle CPUs would time out every leg on a shared
    # machine; the rotating order is what keeps the legs comparable here.
    config = LoadConfig(
        target=address,
        workload=workload,
        concurrency=args.concurrency,
        requests=args.requests,
        warmup=args.concurrency,
        timeout_s=harness.LEG_TIMEOUT_S,
    )
    report = run_bench(config).report
    if report["aborted"] or report["requests"]["errors"]:
        raise RuntimeError(f"the load failed: {report['aborted'] or report['errors_by_code']}")
    tokens_per_s: float = report["throughput"]["tokens_per_s"]
    return tokens_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--legs", default="float32,bfloat16", help=f"of {', '.join(LEGS)}")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=0, help="0: no concurrent load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--flags",
        default="--scheduler continuous --max-batch-size 8 --kv-cache-tokens 4096",
        help="more lmserve serve flags for every leg, one string",
    )
    args = parser.parse_args(argv)
    say(f"{args.model}, {args.flags}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    names = args.legs.split(",")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            figures = measure(args.model, LEGS[name], args)
            results[name].append(figures)
            load = f"; {figures['tokens_per_s']:6.1f} tok/s" if args.requests else ""
            say(
                f"round {round_ + 1} {name:17s} RSS serving {figures['serving_mb']:6.0f} MB, "
                f"warm {figures['warm_mb']:6.0f} MB; decode step {figures['step_ms']:6.1f} ms"
                f"{load}"
            )
    medians = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for name, rounds in results.items()
    }
    base = medians[names[0]]
    say(f"medians of {args.rounds} rounds (ratio to {names[0]}):")
    for name, m in medians.items():
        ratio = {key: m[key] / base[key] if base[key] else 0.0 for key in m}
        load = (
            f"; {m['tokens_per_s']:6.1f} tok/s (x{ratio['tokens_per_s']:.2f})"
            if args.requests
            else ""
        )
        say(
            f"  {name:17s} RSS serving {m['serving_mb']:6.0f} MB (x{ratio['serving_mb']:.2f}), "
            f"warm {m['warm_mb']:6.0f} MB (x{ratio['warm_mb']:.2f}); "
            f"decode step {m['step_ms']:6.1f} ms (x{ratio['step_ms']:.2f}){load}"
        )
    say(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
