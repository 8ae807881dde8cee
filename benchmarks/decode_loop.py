"""The continuous engine's step loop alone, in-process: no gRPC, no queue, no client.

    python benchmarks/decode_loop.py --model models/gpt2-random [--plain-weights]

Drives ``ContinuousBatch`` (planner, runner, rows) as the scheduler's engine thread does, in
a closed loop of ``--clients`` callers: every row that finishes is replaced by the next
request. Prints tok/s, and per step the wall time split into the device's part (the model's
forward and the sampling: ``ModelRunner.last_device_s``) and the host's part (planning,
packing the inputs, handing tokens to rows, retiring them).

The peer benchmark's mixed workload, then its uniform one under every kind of request a
backend sends, in interleaved rounds (a slow spell of a shared machine hits all alike), each
decode step of ~16 rows against a greedy one of the same round:

- ``sampled``: every row samples (temperature 0.8, top-p 0.95, top-k 50);
- ``sampled+options``: the same with repetition/presence/frequency penalties and 5 logprobs;
- ``nucleus``: temperature 0.8, top-p 0.95 and no top-k (a flat random model's nucleus is
  most of the vocabulary: the sampler's exact pass, every row, every step);
- ``streams+stops``: every row streams, with 16 stop strings of 256 characters (the most a
  request may send) that never match;
- ``json``: every row under a JSON schema (structured output: a mask per row and step),
  one long string property, so rows run their 64 tokens.

Last, ``--host-rows`` rows (64) of the tiny test model in decode steps, one torch thread:
the host's CPU time per step (everything but the forward and the sampling).

``--clock cpu`` times steps in the engine thread's CPU time with one torch thread: on a
machine that other work shares, a step's CPU time is what it costs, where its wall time
also holds every moment the scheduler gave the cores to someone else.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer import WORDS, mixed_specs, uniform_specs

from lmserve.bench_workload import RequestSpec


@dataclass(eq=False)
class _Entry:
    row: object


SCHEMA = (
    '{"type": "object", "properties": {"story": {"type": "string", "maxLength": 2000}, '
    '"done": {"type": "boolean"}}, "required": ["story", "done"]}'
)


# (name, sampling settings, logprobs, stream with stop strings[, under a JSON schema])
def variants() -> list[tuple[str, dict[str, Any], int | None, bool]]:
    sampled = {"temperature": 0.8, "top_p": 0.95, "top_k": 50}
    penalties = {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    return [
        ("greedy", {}, None, False),
        ("sampled", sampled, None, False),
        ("sampled+options", {**sampled, **penalties}, 5, False),
        ("nucleus", {"temperature": 0.8, "top_p": 0.95}, None, False),
        ("streams+stops", {}, None, True),
        ("json", {}, None, False),
    ]


def compiled_schema(engine: object) -> object:
    """``SCHEMA`` compiled for ``engine``'s tokenizer, as the daemon's compile service does."""
    from lmserve_server.engine.model import Engine
    from lmserve_server.grammar.backend import compile_template
    from lmserve_server.grammar.compiler import tokenizer_index
    from lmserve_server.grammar.matcher import CompiledGrammar
    from lmserve_server.grammar.spec import GrammarSpec

    assert isinstance(engine, Engine)
    index = tokenizer_index(engine.tokenizer, engine.vocab_size, engine.end_token_ids)
    spec = GrammarSpec("json_schema", SCHEMA)
    return CompiledGrammar(spec, compile_template(index, spec), index)


def stop_strings() -> tuple[str, ...]:
    """16 strings of 256 characters that a random model's text will not contain."""
    rng = random.Random(2)
    return tuple(
        ("~" + " ".join(rng.choices(WORDS, k=60)))[:256].ljust(256, "~") for _ in range(16)
    )


def run(
    engine: object,
    specs: list[RequestSpec],
    clients: int,
    budget: int,
    sampling: dict[str, Any] | None = None,
    logprobs: int | None = None,
    streams: bool = False,
    step_clock: Any = None,
    grammar: object = None,
) -> dict[str, object]:
    from lmserve_server.engine.model import Engine
    from lmserve_server.engine.types import GenerationRequest, SamplingParams
    from lmserve_server.scheduling.continuous_batch import ContinuousBatch
    from lmserve_server.scheduling.planner import StepPlanner

    assert isinstance(engine, Engine)
    params = SamplingParams(**(sampling or {}))
    stops = stop_strings() if streams else ()
    todo = collections.deque(
        GenerationRequest(
            tuple(engine.tokenize(str(s.prompt))),
            s.max_new_tokens,
            replace(params, seed=i) if not params.greedy else params,
            stop=stops,
            logprobs=logprobs,
            grammar=grammar,  # type: ignore[arg-type]
        )
        for i, s in enumerate(specs)
    )
    runner = engine.continuous_runner(
        slots=clients, kv_tokens=clients * engine.max_context, max_step_tokens=budget
    )
    batch = ContinuousBatch(runner, StepPlanner(max_rows=clients, max_step_tokens=budget))
    waiting: collections.deque[_Entry] = collections.deque()
    deltas: list[object] = []
    steps: list[tuple[int, bool, float, float]] = []  # rows, prefill?, wall s, device s
    tokens = 0
    clock = step_clock or time.perf_counter
    started = time.perf_counter()
    while todo or waiting or batch.running:
        while todo and len(batch.running) + len(waiting) < clients:  # a caller sends again
            on_delta = deltas.append if streams else None
            waiting.append(_Entry(engine.new_row(todo.popleft(), on_delta)))
        step_started = clock()
        work = batch.admit_and_plan(waiting)  # type: ignore[arg-type]
        batch.run(work)
        for ended in batch.retire():
            tokens += ended.row.output().token_ids.__len__()
        wall = clock() - step_started
        prefill = any(len(w.chunk.tokens) > 1 for w in work)
        steps.append((len(work), prefill, wall, runner.last_device_s))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "steps": steps}


def around16(f: dict[str, object]) -> list[tuple[int, bool, float, float]]:
    """The decode-only steps of about 16 rows (all decode steps when there are none)."""
    steps: list[tuple[int, bool, float, float]] = f["steps"]  # type: ignore[assignment]
    decode = [s for s in steps if not s[1]]
    return [s for s in decode if 12 <= s[0] <= 20] or decode


def describe(name: str, f: dict[str, object], cpu_clock: bool = False) -> str:
    steps: list[tuple[int, bool, float, float]] = f["steps"]  # type: ignore[assignment]
    decode = [s for s in steps if not s[1]]
    if cpu_clock:  # the device's part is wall time: no host split against CPU time
        near = around16(f)
        return (
            f"{name:>15}: {f['tokens'] / f['seconds']:6.1f} tok/s, {len(steps)} steps; decode "
            f"steps of {statistics.mean(s[0] for s in near):.0f} rows: "
            f"{1000 * statistics.median(s[2] for s in near):.1f} ms of CPU time (median)"
        )
    wall = sum(s[2] for s in steps)
    host = sum(s[2] - s[3] for s in steps)
    near16 = around16(f)
    host16 = statistics.mean(s[2] - s[3] for s in near16)
    wall16 = statistics.mean(s[2] for s in near16)
    return (
        f"{name:>15}: {f['tokens'] / f['seconds']:6.1f} tok/s, {f['seconds']:5.2f} s, "
        f"{len(steps)} steps ({len(steps) - len(decode)} with prefill); host "
        f"{100 * host / wall:.1f}% of all step time; decode steps of "
        f"{statistics.mean(s[0] for s in near16):.0f} rows: {1000 * wall16:.1f} ms, of which "
        f"host {1000 * host16:.2f} ms ({100 * host16 / wall16:.1f}%)"
    )


def host_time(model: str, rows: int) -> tuple[float, float]:
    """(host CPU ms, step wall ms) of the median decode step of ``rows`` rows, one torch
    thread: the thread's CPU time over the whole step, less its time between the runner's
    device marks (the forward and the sampling)."""
    import torch

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine import runner as runner_module
    from lmserve_server.engine.model import Engine

    torch.set_num_threads(1)
    engine = Engine.load(EngineConfig(model=model))
    device_cpu = [0.0, 0.0]  # thread time at the last start mark; since the step began

    class Marked(runner_module._Device):
        def mark(self, which: int) -> None:
            super().mark(which)
            if which == 0:
                device_cpu[0] = time.thread_time()
            else:
                device_cpu[1] += time.thread_time() - device_cpu[0]

    def clock() -> float:  # read at a step's start and end: the step's device time restarts
        now = time.thread_time()
        clock.started = not getattr(clock, "started", False)  # type: ignore[attr-defined]
        if clock.started:  # type: ignore[attr-defined]
            device_cpu[1] = 0.0
            return now
        return now - device_cpu[1]  # the step's CPU time, less the device part's

    original = runner_module._Device
    runner_module._Device = Marked  # type: ignore[misc]
    try:
        specs = uniform_specs(rows * 2, words=8, new_tokens=32)
        run(engine, specs[:rows], rows, 4 * rows)  # warm-up
        host_steps = run(engine, specs, rows, 4 * rows, step_clock=clock)["steps"]
        wall_steps = run(engine, specs, rows, 4 * rows)["steps"]
    finally:
        runner_module._Device = original  # type: ignore[misc]
    assert isinstance(host_steps, list) and isinstance(wall_steps, list)
    host = [s[2] for s in host_steps if not s[1] and s[0] == rows]
    wall = [s[2] for s in wall_steps if not s[1] and s[0] == rows]
    return 1000 * statistics.median(host), 1000 * statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--plain-weights", action="store_true", help="as --pack-weights false does: no packing"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-step-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--host-rows", type=int, default=64)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by the wall clock, or by the thread's CPU time (one torch thread)",
    )
    parser.add_argument(
        "--tiny-model", default="", help="the tiny test model's directory (made if not given)"
    )
    parser.add_argument(
        "--huge-pages", type=int, default=1, help="as lmserve serve --huge-pages (1) or not (0)"
    )
    args = parser.parse_args(argv)
    # Before torch's first allocation, as the daemon does (torch is imported below).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", str(args.huge_pages))

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine.model import Engine
    from lmserve_server.testmodel import write_test_model

    clock = time.perf_counter
    if args.clock == "cpu":
        import torch

        torch.set_num_threads(1)
        clock = time.thread_time
    engine = Engine.load(
        EngineConfig(model=args.model, device=args.device, pack_weights=not args.plain_weights)
    )
    run(engine, mixed_specs()[:4], args.clients, args.max_step_tokens)  # warm-up
    f = run(engine, mixed_specs(), args.clients, args.max_step_tokens)
    print(describe("mixed", f), flush=True)
    schema = compiled_schema(engine)
    step_ms: dict[str, list[float]] = collections.defaultdict(list)
    ratios: dict[str, list[float]] = collections.defaultdict(list)
    for round_ in range(args.rounds):
        medians = {}
        for name, sampling, logprobs, streams in variants():
            f = run(
                engine,
                uniform_specs(),
                args.clients,
                args.max_step_tokens,
                sampling,
                logprobs,
                streams,
                step_clock=clock,
                grammar=schema if name == "json" else None,
            )
            print(f"round {round_ + 1} {describe(name, f, args.clock == 'cpu')}", flush=True)
            medians[name] = statistics.median(1000 * s[2] for s in around16(f))
            step_ms[name].append(medians[name])
        for name in medians:
            ratios[name].append(medians[name] / medians["greedy"])
    print(f"\ndecode step of ~{args.clients} rows, medians over {args.rounds} rounds:")
    for name in step_ms:
        print(
            f"{name:>15}: {statistics.median(step_ms[name]):6.1f} ms, "
            f"{statistics.median(ratios[name]):.3f}x greedy "
            f"(rounds: {', '.join(f'{r:.3f}' for r in ratios[name])})",
            flush=True,
        )
    tiny = args.tiny_model
    if not tiny:
        tiny = str(write_test_model(Path(tempfile.mkdtemp()) / "tiny-gpt2"))
    host_ms, wall_ms = host_time(tiny, args.host_rows)
    print(
        f"\nhost CPU time of a {args.host_rows}-row decode step (tiny model, one thread): "
        f"{host_ms:.2f} ms of a {wall_ms:.2f} ms step",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
