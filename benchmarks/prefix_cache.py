"""The prefix cache: what it costs and what it buys, side by side.

    python benchmarks/prefix_cache.py --model models/gpt2-random [--only copy,ttft,mixed,engine]

- ``copy`` (in process, the model's own KV shape): what a request with a 512-token cached
  prefix saves and pays. It saves prefilling those tokens (one 512-token chunk, or two of
  256 as the daemon's default budget does); it pays copying the 16 cached blocks into its
  slot (``PrefixCache.restore``), and the request that computed them paid keeping them
  (``store``). What reading shared blocks in place would cost instead, every decode step:
  ``benchmarks/kv_layout.py --rows 16 --context 540`` (the paged layout).
- ``ttft``: a real daemon (``--scheduler continuous``), one stream at a time: the time to
  the first token of a ~525-token request whose 510-token system prompt is new (a new
  prompt each time: nothing cached) and of one whose system prompt was just sent (cached),
  interleaved; medians and their ratio (the target: <= 0.2).
- ``mixed``: the peer benchmark's mixed load (48 requests, 3-150-word prompts, 4-96 new
  tokens, 16 clients: nothing shared) against ``--prefix-cache true`` and ``false``,
  interleaved rounds (alternating which goes first); tok/s per round and the median ratio
  (the target: within 3%, what a cache that finds nothing may cost).
- ``engine`` (in process, one thread, thread CPU time): the same mixed requests through the
  continuous batch with a prefix cache (emptied before each run: nothing is found) and
  without, alternating; what the cache's bookkeeping and copies cost a load that shares
  nothing, without the daemon's noise.

Each line printed is a measured figure; ``--json`` keeps them all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, headline, load, say, wait_for_quiet
from peer import WORDS, mixed_specs, uniform_specs

from lmserve import Client
from lmserve.bench_workload import prompt_of_length


def copy_figures(setup: Setup, repeats: int) -> dict[str, float]:
    """Milliseconds (min of ``repeats``): prefilling 512 tokens in one chunk and in two of
    256, restoring 16 cached blocks into a slot, and storing 16 blocks."""
    import random

    import torch

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine.block_pool import BlockPool
    from lmserve_server.engine.model import Engine
    from lmserve_server.engine.prefix_cache import BLOCK, CachedBlock, PrefixCache
    from lmserve_server.engine.runner import Chunk

    engine = Engine.load(EngineConfig(model=setup.model, device=setup.device))
    runner = engine.continuous_runner(slots=2, kv_tokens=2048, max_step_tokens=512)
    cache = runner.cache
    table = tuple(range(16))
    rng = random.Random(0)
    prompt = tuple(rng.randrange(50000) for _ in range(512))
    sync = torch.cuda.synchronize if cache.device.type == "cuda" else (lambda: None)

    def timed(work: Any) -> float:
        work()
        best = float("inf")
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            work()
            sync()
            best = min(best, time.perf_counter() - started)
        return best * 1000

    figures = {
        "prefill_512_one_chunk_ms": timed(
            lambda: runner.execute([Chunk(0, prompt, 0, True, blocks=table)])
        ),
        "prefill_512_two_chunks_ms": timed(
            lambda: (
                runner.execute([Chunk(0, prompt[:256], 0, blocks=table)]),
                runner.execute([Chunk(0, prompt[256:], 256, True, blocks=table)]),
            )
        ),
    }

    def store() -> None:
        # An index of its own over a pool of its own: every block is new. Keeping blocks
        # is bookkeeping only: they are shared in place, never copied.
        prefixes = PrefixCache(BlockPool(64), tokens=64 * BLOCK)
        chain: list[CachedBlock] = []
        prefixes.store(table, "", prompt, chain, computed=512)

    figures["store_16_blocks_ms"] = timed(store)
    figures["bytes_per_token"] = engine.kv_shape.bytes_per_token
    return figures


def ttft_figures(setup: Setup, pairs: int) -> dict[str, Any]:
    """Time to first token (seconds) of uncached and cached ~525-token requests, in turns."""
    uncached: list[float] = []
    cached: list[float] = []
    hits: list[int] = []
    with daemon(setup, "--scheduler", "continuous") as address, Client(address, timeout=600) as c:
        for text in uniform_specs(4):  # warm-up, untimed
            c.generate(text.prompt, max_new_tokens=4)

        def first_token(prompt: str) -> tuple[float, int]:
            started = time.perf_counter()
            first = None
            last = None
            for chunk in c.stream(prompt, max_new_tokens=4):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - started
                last = chunk
            assert first is not None and last is not None
            return first, last.cached_prompt_tokens

        for i in range(pairs):
            system = prompt_of_length(510, seed=5000 + i)  # never sent before
            wait_for_quiet()
            seconds, cached_tokens = first_token(f"{system}\nQuestion: {WORDS[i]} or {WORDS[-i]}?")
            assert cached_tokens == 0
            uncached.append(seconds)
            wait_for_quiet()
            seconds, cached_tokens = first_token(f"{system}\nQuestion: {WORDS[i + 1]} and why?")
            cached.append(seconds)
            hits.append(cached_tokens)
            say(
                f"pair {i + 1}: first token {uncached[-1] * 1000:.0f} ms uncached, "
                f"{cached[-1] * 1000:.0f} ms cached ({cached_tokens} prompt tokens cached)"
            )
    ratio = statistics.median(cached) / statistics.median(uncached)
    return {
        "uncached_ms": [s * 1000 for s in uncached],
        "cached_ms": [s * 1000 for s in cached],
        "cached_prompt_tokens": hits,
        "median_uncached_ms": statistics.median(uncached) * 1000,
        "median_cached_ms": statistics.median(cached) * 1000,
        "ratio": ratio,
    }


def mixed_figures(setup: Setup, rounds: int) -> dict[str, Any]:
    """The mixed load's tok/s with the prefix cache on and off, interleaved rounds."""
    variants = [("on", "true"), ("off", "false")]
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    ratios = []
    for round_ in range(rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for name, flag in order:
            with daemon(setup, "--scheduler", "continuous", "--prefix-cache", flag) as address:
                load(address, uniform_specs(4), requests=4, concurrency=4)  # warm-up
                figures = headline(load(address, mixed_specs(), requests=48, concurrency=16).report)
            runs[name].append(figures)
            say(
                f"round {round_ + 1} mixed, prefix cache {name:>3}: "
                f"{figures['tokens_per_s']:6.1f} tok/s p50 {figures['p50_ms']:6.0f} ms "
                f"p99 {figures['p99_ms']:6.0f} ms"
            )
        ratios.append(runs["on"][-1]["tokens_per_s"] / runs["off"][-1]["tokens_per_s"])
        say(f"round {round_ + 1} mixed: on / off = {ratios[-1]:.3f}")
    return {"runs": runs, "ratios": ratios, "median_ratio": statistics.median(ratios)}


def engine_figures(setup: Setup, rounds: int) -> dict[str, Any]:
    """Thread CPU seconds of the mixed requests run to the end through ``ContinuousBatch``
    with an empty prefix cache and with none, alternating; and whether both gave every
    request the same tokens."""
    from collections import deque
    from dataclasses import dataclass

    import torch

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine.model import Engine
    from lmserve_server.engine.rows import Row
    from lmserve_server.engine.types import GenerationRequest, SamplingParams
    from lmserve_server.scheduling.continuous_batch import ContinuousBatch
    from lmserve_server.scheduling.planner import StepPlanner

    @dataclass(eq=False)
    class Entry:
        row: Row

    torch.set_num_threads(1)
    engine = Engine.load(EngineConfig(model=setup.model, device=setup.device))
    requests = [
        GenerationRequest(tuple(engine.tokenizer(s.prompt)["input_ids"]), s.max_new_tokens)
        for s in mixed_specs()
        if isinstance(s.prompt, str)
    ]
    assert all(r.sampling == SamplingParams() for r in requests)

    def batch(prefix_tokens: int) -> ContinuousBatch[Entry]:
        runner = engine.continuous_runner(
            slots=16, kv_tokens=16 * 1024, max_step_tokens=256, prefix_cache_tokens=prefix_tokens
        )
        return ContinuousBatch(runner, StepPlanner(max_rows=16, max_step_tokens=256))

    batches = {"on": batch(4096), "off": batch(0)}
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    tokens: dict[str, list[tuple[int, ...]]] = {}
    for round_ in range(rounds + 1):  # the first round warms both up, untimed
        for name in ("on", "off") if round_ % 2 else ("off", "on"):
            b = batches[name]
            prefixes = b.runner.cache.prefixes
            if prefixes is not None:  # empty: this load must find nothing
                while prefixes.index.evict_idle() is not None:
                    pass
            rows = [engine.new_row(r) for r in requests]
            waiting = deque(Entry(row) for row in rows)
            started = time.thread_time()
            while waiting or b.running:
                b.run(b.admit_and_plan(waiting))
                b.retire()
            if round_:
                seconds[name].append(time.thread_time() - started)
                say(f"engine round {round_}, prefix cache {name:>3}: {seconds[name][-1]:.2f} s")
            tokens[name] = [row.output().token_ids for row in rows]
    ratio = statistics.median(seconds["on"]) / statistics.median(seconds["off"])
    return {"seconds": seconds, "ratio": ratio, "same_tokens": tokens["on"] == tokens["off"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="mixed: rounds (default: 3)")
    parser.add_argument("--pairs", type=int, default=8, help="ttft: pairs (default: 8)")
    parser.add_argument("--repeats", type=int, default=5, help="copy: repeats (default: 5)")
    parser.add_argument("--only", default="copy,ttft,mixed,engine")
    parser.add_argument("--json", default="bench-results/prefix_cache.json")
    args = parser.parse_args(argv)
    setup = Setup(model=args.model, device=args.device)
    only = {part.strip() for part in args.only.split(",")}
    results: dict[str, Any] = {}
    figures: dict[str, Any]
    if "copy" in only:
        figures = copy_figures(setup, args.repeats)
        results["copy"] = figures
        say(
            f"512-token prefix: prefill {figures['prefill_512_one_chunk_ms']:.1f} ms in one "
            f"chunk, {figures['prefill_512_two_chunks_ms']:.1f} ms in two of 256; keep 16 "
            "blocks (in place) "
            f"{figures['store_16_blocks_ms']:.3f} ms ({figures['bytes_per_token']} bytes a token)"
        )
    if "ttft" in only:
        figures = ttft_figures(setup, args.pairs)
        results["ttft"] = figures
        say(
            f"first token, medians of {args.pairs}: uncached {figures['median_uncached_ms']:.0f} "
            f"ms, cached {figures['median_cached_ms']:.0f} ms: {figures['ratio']:.3f}x"
        )
    if "mixed" in only:
        figures = mixed_figures(setup, args.rounds)
        results["mixed"] = figures
        say(
            f"mixed load, prefix cache on / off: {', '.join(f'{r:.3f}' for r in figures['ratios'])}"
            f" (median {figures['median_ratio']:.3f})"
        )
    if "engine" in only:
        figures = engine_figures(setup, args.rounds)
        results["engine"] = figures
        say(
            f"mixed requests in process, CPU time with an empty prefix cache / without: "
            f"{figures['ratio']:.3f}x (same tokens: {figures['same_tokens']})"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
