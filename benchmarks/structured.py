"""Grammar compiles beside running streams: do new schemas stall the daemon's other callers?

    python benchmarks/structured.py --model models/gpt2-random [--rounds 3]

A continuous daemon serves 16 streams (48-word prompts, ``--stream-tokens`` new tokens
each) while 8 more requests under a JSON schema (30 properties of every kind) come in, one
every 100 ms. In the *cached* leg the 8 send a schema compiled before the leg (the compile
cache answers); in the *new* leg each sends a schema never seen (a fresh property name), so
8 compiles run on the compile threads while the streams decode. The extra rows are the same
in both legs, so the difference is the compiles. Figure: the streams' inter-token gaps (as
their client receives the chunks), p50 and p99, per leg; legs interleaved by round, the
ratio new / cached of the p99 per round and its median.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon
from peer import WORDS

from lmserve import Client, JsonSchema
from lmserve.bench_stats import percentile

KINDS = [
    {"type": "string", "maxLength": 12},
    {"type": "integer", "minimum": 0, "maximum": 1000},
    {"type": "boolean"},
    {"enum": ["red", "green", "blue"]},
    {"type": "array", "items": {"type": "number"}, "maxItems": 3},
    {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}},
]


def schema(tag: str) -> dict[str, object]:
    """A 30-property schema; ``tag`` makes its text (the compile cache's key) new."""
    properties = {f"{tag}_{i}": KINDS[i % len(KINDS)] for i in range(30)}
    return {"type": "object", "properties": properties, "required": list(properties)[:10]}


def leg(address: str, tags: list[str], stream_tokens: int) -> list[float]:
    """Inter-token gaps (s) of 16 streams while 8 constrained requests come in."""
    rng = random.Random(5)
    prompts = [" ".join(rng.choices(WORDS, k=48)) for _ in range(16)]
    gaps: list[float] = []
    lock = threading.Lock()
    started = threading.Barrier(17)

    def stream(prompt: str) -> None:
        mine: list[float] = []
        with Client(address, timeout=900) as client:
            started.wait()
            last = time.perf_counter()
            for chunk in client.stream(prompt, max_new_tokens=stream_tokens):
                now = time.perf_counter()
                if chunk.token_ids:
                    mine += [now - last] + [0.0] * (len(chunk.token_ids) - 1)
                last = now
        with lock:
            gaps.extend(mine[1:])  # the first is the time to first token, not a gap

    def constrained() -> None:
        with Client(address, timeout=900) as client:
            started.wait()
            time.sleep(1.0)  # the streams are decoding
            calls = []
            for tag in tags:
                output = JsonSchema(schema(tag))
                calls.append(
                    threading.Thread(
                        target=client.generate,
                        args=("A record:",),
                        kwargs={"max_new_tokens": 16, "structured_output": output},
                    )
                )
                calls[-1].start()
                time.sleep(0.1)
            for call in calls:
                call.join()

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    threads.append(threading.Thread(target=constrained))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-tokens", type=int, default=96)
    parser.add_argument("--json", default="bench-results/structured.json")
    args = parser.parse_args(argv)
    setup = Setup(model=args.model, device=args.device)
    results: dict[str, list[dict[str, float]]] = {"cached": [], "new": []}
    with daemon(setup, "--scheduler", "continuous", "--max-batch-size", "32") as address:
        with Client(address, timeout=900) as client:  # the cached leg's schema, compiled
            client.generate(
                "A record:", max_new_tokens=2, structured_output=JsonSchema(schema("c"))
            )
        for round_ in range(args.rounds):
            legs = [("cached", ["c"] * 8), ("new", [f"r{round_}n{i}" for i in range(8)])]
            for name, tags in legs if round_ % 2 == 0 else legs[::-1]:
                gaps = leg(address, tags, args.stream_tokens)
                figures = {
                    "p50_ms": 1000 * percentile(gaps, 50),
                    "p99_ms": 1000 * percentile(gaps, 99),
                    "gaps": len(gaps),
                }
                results[name].append(figures)
                print(
                    f"round {round_ + 1} {name:>6}: inter-token p50 {figures['p50_ms']:6.1f} ms "
                    f"p99 {figures['p99_ms']:6.1f} ms over {len(gaps)} gaps",
                    flush=True,
                )
    ratios = [
        n["p99_ms"] / c["p99_ms"] for n, c in zip(results["new"], results["cached"], strict=True)
    ]
    print(
        f"streams' inter-token p99, new schemas compiling / cached: median "
        f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})",
        flush=True,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rounds": results, "p99_ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
