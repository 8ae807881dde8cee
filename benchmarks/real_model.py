"""The real default model under both schedulers, side by side in one run.

    python benchmarks/real_model.py --rounds 3

SmolLM2-135M-Instruct (the Q4_1 GGUF file ``lmserve fetch-model`` caches, served as it is,
dequantized to fp32) answering chat messages: the mixed workload's text (8-48 words) sent as
one user message each, as ``lmserve-client bench --chat`` sends it, 24 requests with 16-64
new tokens, 8 clients in a closed loop; greedy (``chat``), then sampled at temperature 0.8
with a seed each (``chat-sampled``). An instruct model ends many answers at the end of its
turn before ``max_new_tokens``: throughput counts the tokens each server reports it made.

The servers: lmserve ``--scheduler static`` (the default) and ``--scheduler continuous
--kv-cache-tokens 16384`` (8 rows of 2048 tokens; its default, a full 8192-token context
for each of 32 rows, would take 11.6 GiB). Each is started, measured and stopped in turn,
rounds alternating their order so a slow spell of a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, headline, load, say

from lmserve import ChatMessage
from lmserve.bench_workload import ListWorkload, MixedWorkload, RequestSpec
from lmserve_server.fetch import fetch_model

REQUESTS, CLIENTS = 24, 8
SERVERS = {
    "static": ("--scheduler", "static", "--max-batch-size", "8"),
    "continuous": (
        "--scheduler",
        "continuous",
        "--max-batch-size",
        "8",
        "--kv-cache-tokens",
        "16384",
    ),
}


def workloads(requests: int) -> dict[str, ListWorkload]:
    mixed = MixedWorkload((8, 48), (16, 64), seed=11)
    specs = [mixed.spec(i) for i in range(requests)]
    greedy = [RequestSpec((ChatMessage("user", str(s.prompt)),), s.max_new_tokens) for s in specs]
    sampled = [
        RequestSpec(s.prompt, s.max_new_tokens, (("temperature", 0.8), ("seed", i)))
        for i, s in enumerate(greedy)
    ]
    return {"chat": ListWorkload(greedy), "chat-sampled": ListWorkload(sampled)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="per leg")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--json", default="bench-results/real_model.json")
    args = parser.parse_args(argv)
    setup = Setup(model=str(fetch_model()))
    loads = workloads(args.requests)
    figures: dict[str, dict[str, list[dict[str, float]]]] = {
        w: {s: [] for s in SERVERS} for w in loads
    }
    for round_ in range(args.rounds):
        order = list(SERVERS) if round_ % 2 == 0 else list(reversed(SERVERS))
        for server in order:
            with daemon(setup, *SERVERS[server]) as address:
                for name, workload in loads.items():
                    result = load(
                        address, workload, requests=args.requests, concurrency=args.clients
                    )
                    row = headline(result.report)
                    figures[name][server].append(row)
                    say(
                        f"round {round_ + 1} {name:<13} {server:<11} "
                        f"{row['tokens_per_s']:7.1f} tok/s  p50 {row['p50_ms']:7.0f} ms  "
                        f"{row['tokens']} tokens"
                    )
    say("\nmedians over rounds; ratio = continuous tok/s over static's")
    summary: dict[str, Any] = {}
    for name, by_server in figures.items():
        medians = {
            s: statistics.median(r["tokens_per_s"] for r in rows) for s, rows in by_server.items()
        }
        ratio = medians["continuous"] / medians["static"]
        summary[name] = {"median_tokens_per_s": medians, "ratio": ratio, "rounds": by_server}
        say(
            f"{name:<13} static {medians['static']:7.1f} tok/s  continuous "
            f"{medians['continuous']:7.1f} tok/s  ratio {ratio:.2f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
