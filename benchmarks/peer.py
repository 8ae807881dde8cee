"""Engine performance against the continuous-batching peer, side by side in one run.

    python benchmarks/peer.py --model models/gpt2-random

The workload of the engine-performance issue: 48 requests with 3-150-word prompts and 4-96
new tokens (seeded, the same for every server), 16 clients in a closed loop; the same
requests sampled (temperature 0.8, top-p 0.95, a seed each: what most traffic sends); a
uniform one: 16 equal requests, 16 clients; a single client sending 6 requests one after
another (what a quiet server gives one caller); and the shared-prompt load of the
prefix-cache issue: 48 requests, each the same 510-token system prompt and a short question
of its own, 16 new tokens, 16 clients (``shared``: 511 tokens in common; ``shared-aligned``:
512, two full pages of the peer's cache, the most it can share). The servers, each started,
measured and stopped in turn (rounds alternate their order, so a slow spell of a shared
machine hits all alike):

- lmserve, ``--scheduler static`` (the design's default: one generate per batch),
- lmserve, ``--scheduler static --pack-weights false`` (the same, weights as transformers
  loads them: what packing buys),
- lmserve, ``--scheduler continuous`` (iteration-level batching; its prefix cache on),
- lmserve, ``--scheduler continuous --prefix-cache false`` (what the prefix cache buys),
- a plain static batcher (``static_server.py``: every row runs to its batch's largest
  max_new_tokens),
- the peer: ``transformers serve --continuous-batching`` (OpenAI completions over HTTP,
  driven by a closed-loop client of the same shape).

Every server gets the same prompts and max_new_tokens; throughput counts the tokens each
server reports it generated. Needs ``pip install 'transformers[serving]'`` for the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, headline, load, say, stop_process, wait_for_quiet

from lmserve.bench_stats import percentile
from lmserve.bench_workload import RequestSpec, prompt_of_length

# Plain English words: prompts that tokenize like text (about 1.3 tokens a word).
_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or has had not but one their new after also who they been its first two more "
    "time year over other all into only most some city world state would when river house "
    "music film team game war school party people water system life story"
)
WORDS = _TEXT.split()

Measure = Callable[[Sequence[RequestSpec], int], dict[str, float]]


def mixed_specs(count: int = 48, seed: int = 0) -> list[RequestSpec]:
    """Prompts of 3-150 words and 4-96 new tokens, drawn from a seeded generator."""
    rng = random.Random(seed)
    return [
        RequestSpec(" ".join(rng.choices(WORDS, k=rng.randint(3, 150))), rng.randint(4, 96))
        for _ in range(count)
    ]


# What most backend traffic sends: a seeded sample, temperature and nucleus (no top-k).
SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def sampled_specs(count: int = 48, seed: int = 0) -> list[RequestSpec]:
    """The mixed workload's requests, each sampling with ``SAMPLING`` and its own seed."""
    return [
        RequestSpec(spec.prompt, spec.max_new_tokens, (*SAMPLING.items(), ("seed", i)))
        for i, spec in enumerate(mixed_specs(count, seed))
    ]


def uniform_specs(count: int = 16, words: int = 48, new_tokens: int = 64) -> list[RequestSpec]:
    rng = random.Random(1)
    return [RequestSpec(" ".join(rng.choices(WORDS, k=words)), new_tokens) for _ in range(count)]


def shared_specs(
    count: int = 48,
    system_tokens: int = 510,
    new_tokens: int = 16,
    seed: int = 0,
    aligned: bool = False,
) -> list[RequestSpec]:
    """The same ``system_tokens``-token system prompt and a newline, then a question of its
    own: its number and 5-12 words (about 525 GPT-2 tokens in all), ``new_tokens`` each,
    greedy. The requests share their first 511 tokens; ``aligned``: the question starts
    with "Question", so they share 512, exactly two of the peer's 256-token cache pages
    (its best case: it shares full pages only)."""
    system = prompt_of_length(system_tokens, seed=1000 + seed)
    rng = random.Random(seed)
    lead = "Question " if aligned else ""
    return [
        RequestSpec(
            f"{system}\n{lead}{i}. {' '.join(rng.choices(WORDS, k=rng.randint(5, 12)))}?",
            new_tokens,
        )
        for i in range(count)
    ]


def _summary(latencies: list[float], tokens: int, seconds: float) -> dict[str, float]:
    return {
        "tokens_per_s": tokens / seconds,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "seconds": seconds,
        "tokens": tokens,
    }


def measure_lmserve(address: str) -> Measure:
    def run(specs: Sequence[RequestSpec], concurrency: int) -> dict[str, float]:
        return headline(load(address, specs, requests=len(specs), concurrency=concurrency).report)

    return run


def measure_peer(base_url: str, model: str) -> Measure:
    """A closed loop of ``concurrency`` threads against OpenAI /v1/completions."""

    def run(specs: Sequence[RequestSpec], concurrency: int) -> dict[str, float]:
        wait_for_quiet()
        todo = list(specs)
        lock = threading.Lock()
        latencies: list[float] = []
        tokens = [0]
        errors: list[str] = []

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    spec = todo.pop(0)
                body = {
                    "model": model,
                    "prompt": spec.prompt,
                    "max_tokens": spec.max_new_tokens,
                    **dict(spec.options),  # temperature, top_p, seed: OpenAI's names too
                }
                request = urllib.request.Request(
                    f"{base_url}/v1/completions",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                started = time.perf_counter()
                try:
                    with urllib.request.urlopen(request, timeout=900) as reply:
                        usage = json.load(reply)["usage"]
                except Exception as err:  # counted, and the figure is refused below
                    errors.append(repr(err))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens[0] += usage["completion_tokens"]

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"the peer failed {len(errors)} requests: {errors[:3]}")
        return _summary(latencies, tokens[0], time.perf_counter() - started)

    return run


@contextmanager
def peer_server(setup: Setup) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        os.path.join(os.path.dirname(sys.executable), "transformers"),
        "serve",
        setup.model,
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        setup.device,
        "--dtype",
        "float32" if setup.device == "cpu" else "float16",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, f"transformers serve exited with {proc.returncode}"
                assert time.monotonic() < deadline, "transformers serve did not come up"
                time.sleep(0.5)
        yield url
    finally:
        stop_process(proc, grace_s=30)


PEER = "transformers serve CB"


def compare(
    setup: Setup, rounds: int, only: Sequence[str] = (), only_workloads: Sequence[str] = ()
) -> dict[str, Any]:
    workloads = {
        "mixed": (mixed_specs(), 16),
        "sampled": (sampled_specs(), 16),
        "uniform": (uniform_specs(), 16),
        "single": (uniform_specs(6, new_tokens=32), 1),
        "shared": (shared_specs(), 16),
        "shared-aligned": (shared_specs(aligned=True), 16),
    }
    if only_workloads:
        workloads = {k: v for k, v in workloads.items() if k in only_workloads}
    results: dict[str, dict[str, list[dict[str, float]]]] = {w: {} for w in workloads}
    servers: list[tuple[str, Callable[[], Any]]] = [
        ("lmserve static", lambda: daemon(setup)),
        ("lmserve static plain", lambda: daemon(setup, "--pack-weights", "false")),
        ("lmserve continuous", lambda: daemon(setup, "--scheduler", "continuous")),
        (
            "lmserve continuous no-cache",
            lambda: daemon(setup, "--scheduler", "continuous", "--prefix-cache", "false"),
        ),
        ("static batcher", lambda: daemon(setup, static=True)),
        (PEER, lambda: peer_server(setup)),
    ]
    servers = [(name, start) for name, start in servers if not only or name in only]
    for round_ in range(rounds):
        order = servers if round_ % 2 == 0 else servers[::-1]
        for name, start in order:
            with start() as address:
                if name.startswith("transformers"):
                    measure = measure_peer(address, setup.model)
                else:
                    measure = measure_lmserve(address)
                measure(uniform_specs(4), 4)  # warm-up, untimed
                for workload, (specs, concurrency) in workloads.items():
                    figures = measure(specs, concurrency)
                    results[workload].setdefault(name, []).append(figures)
                    say(
                        f"round {round_ + 1} {workload:>7} {name:>22}: "
                        f"{figures['tokens_per_s']:6.1f} tok/s {figures['requests_per_s']:5.2f} "
                        f"req/s p50 {figures['p50_ms']:7.0f} ms p99 {figures['p99_ms']:7.0f} ms"
                    )
    return results


def grouping(setup: Setup, rounds: int) -> dict[str, dict[str, float]]:
    """What --group-similar buys the static scheduler: the mixed workload with more clients
    (16) than batch rows (8), so that batches are chosen from a longer queue."""
    runs: dict[str, list[dict[str, float]]] = {}
    variants = [("grouped", "true"), ("arrival order", "false")]
    for round_ in range(rounds):
        for name, flag in variants if round_ % 2 == 0 else variants[::-1]:
            flags = ("--max-batch-size", "8", "--group-similar", flag)
            with daemon(setup, *flags) as address:
                measure = measure_lmserve(address)
                measure(uniform_specs(4), 4)  # warm-up
                figures = measure(mixed_specs(), 16)
            runs.setdefault(name, []).append(figures)
            say(
                f"round {round_ + 1} static, batch 8, {name:>13}: "
                f"{figures['tokens_per_s']:6.1f} tok/s p50 {figures['p50_ms']:7.0f} ms "
                f"p99 {figures['p99_ms']:7.0f} ms"
            )
    return {name: median_of(r) for name, r in runs.items()}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def in_process_uniform(setup: Setup, *, pack_weights: bool) -> float:
    """tokens/s of one direct generate over the uniform batch: the ceiling for serving it."""
    from harness import InProcess

    local = InProcess(setup, pack_weights=pack_weights)
    specs = uniform_specs()
    local.generate(specs[:4])
    seconds, rows = local.generate(specs)
    return sum(len(r) for r in rows) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="bench-results/peer.json")
    parser.add_argument(
        "--servers",
        default="",
        help="a comma-separated subset of: lmserve static, lmserve static plain, lmserve "
        "continuous, lmserve continuous no-cache, static batcher (the peer always runs: every "
        "ratio is to it)",
    )
    parser.add_argument(
        "--workloads",
        default="",
        help="a comma-separated subset of: mixed, sampled, uniform, single, shared, "
        "shared-aligned (default: all)",
    )
    parser.add_argument(
        "--skip-extras",
        action="store_true",
        help="only the side-by-side comparison: no --group-similar legs, no in-process ceiling",
    )
    args = parser.parse_args(argv)
    setup = Setup(model=args.model, device=args.device)
    only = [n.strip() for n in args.servers.split(",") if n.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    results = compare(setup, args.rounds, [*only, PEER] if only else (), workloads)
    if args.skip_extras:
        return report(args.json, results, None, None)
    grouped = grouping(setup, args.rounds)
    ceilings = {
        "plain": in_process_uniform(setup, pack_weights=False),
        "packed": in_process_uniform(setup, pack_weights=True),
    }
    return report(args.json, results, grouped, ceilings)


def report(
    path: str,
    results: dict[str, Any],
    grouped: dict[str, dict[str, float]] | None,
    ceilings: dict[str, float] | None,
) -> int:
    """Prints the medians and ratios and writes them, with every round's figures, as JSON."""
    summary: dict[str, Any] = {
        "in_process_uniform_tokens_per_s": ceilings,
        "grouping": grouped,
        "workloads": {},
    }
    say("\nmedians over rounds; ratio = tok/s over the peer's")
    for workload, by_server in results.items():
        peer = median_of(by_server[PEER])
        summary["workloads"][workload] = {}
        for name, runs in by_server.items():
            m = median_of(runs)
            m["ratio_to_peer"] = m["tokens_per_s"] / peer["tokens_per_s"]
            m["p99_vs_peer"] = m["p99_ms"] / peer["p99_ms"]
            summary["workloads"][workload][name] = m
            say(
                f"{workload:>7} {name:>22}: {m['tokens_per_s']:6.1f} tok/s "
                f"({m['ratio_to_peer']:.2f}x peer), {m['requests_per_s']:.2f} req/s, "
                f"p50 {m['p50_ms']:.0f} ms, p99 {m['p99_ms']:.0f} ms "
                f"({m['p99_vs_peer']:.2f}x peer's p99)"
            )
    if grouped is not None:
        gain = grouped["grouped"]["tokens_per_s"] / grouped["arrival order"]["tokens_per_s"]
        say(f"--group-similar, batch 8 of 16 clients: {gain:.2f}x the tok/s of arrival order")
    if ceilings is not None:
        for weights, ceiling in ceilings.items():
            say(f"in-process generate, uniform batch, {weights} weights: {ceiling:.1f} tok/s")
        # Each server against generate() with the weights it serves.
        serves = {
            "lmserve static": "packed",
            "lmserve static plain": "plain",
            "lmserve continuous": "packed",
        }
        for name, weights in serves.items():
            uniform = summary["workloads"].get("uniform", {}).get(name)
            if uniform:
                ratio = uniform["tokens_per_s"] / ceilings[weights]
                uniform["ratio_to_in_process"] = ratio
                say(f"uniform {name}: {ratio:.2f} of in-process generate ({weights})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"raw": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
