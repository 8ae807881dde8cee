"""The continuous engine's step loop alone, in-process: no gRPC, no queue, no client.

    python benchmarks/decode_loop.py --model models/gpt2-random [--plain-weights]

Drives ``ContinuousBatch`` (planner, runner, rows) as the scheduler's engine thread does, in
a closed loop of ``--clients`` callers: every row that finishes is replaced by the next
request. Runs the peer benchmark's mixed and uniform workloads (``peer.py``) and prints
tok/s, and per step the wall time split into the device's part (the model's forward and
the sampling: ``ModelRunner.last_device_s``) and the host's part (planning, packing the
inputs, handing tokens to rows, retiring them), overall and for steps of about 16 rows.
Then the uniform workload again with every row using penalties and logprobs (the request
options' sampler at full work) and its decode step's cost beside the greedy one's.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer import mixed_specs, uniform_specs

from lmserve.bench_workload import RequestSpec


@dataclass(eq=False)
class _Entry:
    row: object


# Every row with every per-token option that costs sampler work.
OPTIONS = {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.5}
LOGPROBS = 5


def run(
    engine: object, specs: list[RequestSpec], clients: int, budget: int, options: bool = False
) -> dict[str, object]:
    from lmserve_server.engine.model import Engine
    from lmserve_server.engine.types import GenerationRequest, SamplingParams
    from lmserve_server.scheduling.continuous_batch import ContinuousBatch
    from lmserve_server.scheduling.planner import StepPlanner

    assert isinstance(engine, Engine)
    sampling = SamplingParams(**OPTIONS) if options else SamplingParams()
    logprobs = LOGPROBS if options else None
    todo = collections.deque(
        GenerationRequest(
            tuple(engine.tokenize(str(s.prompt))), s.max_new_tokens, sampling, logprobs=logprobs
        )
        for s in specs
    )
    runner = engine.continuous_runner(
        slots=clients, slot_tokens=engine.max_context, max_step_tokens=budget
    )
    batch = ContinuousBatch(runner, StepPlanner(max_rows=clients, max_step_tokens=budget))
    waiting: collections.deque[_Entry] = collections.deque()
    steps: list[tuple[int, bool, float, float]] = []  # rows, prefill?, wall s, device s
    tokens = 0
    started = time.perf_counter()
    while todo or waiting or batch.running:
        while todo and len(batch.running) + len(waiting) < clients:  # a caller sends again
            waiting.append(_Entry(engine.new_row(todo.popleft())))
        step_started = time.perf_counter()
        work = batch.plan(waiting)  # type: ignore[arg-type]
        batch.run(work)
        for ended in batch.retire():
            tokens += ended.row.generated
        wall = time.perf_counter() - step_started
        prefill = any(len(w.chunk.tokens) > 1 for w in work)
        steps.append((len(work), prefill, wall, runner.last_device_s))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "steps": steps}


def around16(f: dict[str, object]) -> list[tuple[int, bool, float, float]]:
    """The decode-only steps of about 16 rows (all decode steps when there are none)."""
    steps: list[tuple[int, bool, float, float]] = f["steps"]  # type: ignore[assignment]
    decode = [s for s in steps if not s[1]]
    return [s for s in decode if 12 <= s[0] <= 20] or decode


def describe(name: str, f: dict[str, object]) -> str:
    steps: list[tuple[int, bool, float, float]] = f["steps"]  # type: ignore[assignment]
    decode = [s for s in steps if not s[1]]
    wall = sum(s[2] for s in steps)
    host = sum(s[2] - s[3] for s in steps)
    near16 = around16(f)
    host16 = statistics.mean(s[2] - s[3] for s in near16)
    wall16 = statistics.mean(s[2] for s in near16)
    return (
        f"{name:>7}: {f['tokens'] / f['seconds']:6.1f} tok/s, {f['seconds']:5.2f} s, "
        f"{len(steps)} steps ({len(steps) - len(decode)} with prefill); host "
        f"{100 * host / wall:.1f}% of all step time; decode steps of "
        f"{statistics.mean(s[0] for s in near16):.0f} rows: {1000 * wall16:.1f} ms, of which "
        f"host {1000 * host16:.2f} ms ({100 * host16 / wall16:.1f}%)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--plain-weights", action="store_true", help="as --pack-weights false does: no packing"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-step-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--huge-pages", type=int, default=1, help="as lmserve serve --huge-pages (1) or not (0)"
    )
    args = parser.parse_args(argv)
    # Before torch's first allocation, as the daemon does (torch is imported below).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", str(args.huge_pages))

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine.model import Engine

    engine = Engine.load(
        EngineConfig(model=args.model, device=args.device, pack_weights=not args.plain_weights)
    )
    run(engine, mixed_specs()[:4], args.clients, args.max_step_tokens)  # warm-up
    step_ms: dict[str, list[float]] = collections.defaultdict(list)
    for name, specs, options in (
        ("mixed", mixed_specs(), False),
        ("uniform", uniform_specs(), False),
        ("options", uniform_specs(), True),
    ):
        for _ in range(args.repeats):
            f = run(engine, specs, args.clients, args.max_step_tokens, options)
            print(describe(name, f), flush=True)
            step_ms[name] += [1000 * s[2] for s in around16(f)]
    greedy, optioned = statistics.median(step_ms["uniform"]), statistics.median(step_ms["options"])
    print(
        f"decode step, ~{args.clients} rows: greedy {greedy:.1f} ms, every row with penalties "
        f"and {LOGPROBS} logprobs {optioned:.1f} ms: {optioned / greedy:.2f}x",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
