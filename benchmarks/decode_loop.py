"""The continuous scheduler's decode loop alone, in-process: no gRPC, no queue, no client.

    python benchmarks/decode_loop.py --model models/gpt2-random [--plain-weights]

Drives ``DecodeBatch`` the way the scheduler does in a closed loop of ``--clients`` callers:
every row that finishes is replaced by the next request at the next step. Runs the peer
benchmark's mixed and uniform workloads (``peer.py``) and prints tok/s, how many steps ran,
how many of them admitted prompts, and their share of the time: the figures behind the
engine's changes (what a daemon adds on top is ``peer.py``'s to measure).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer import mixed_specs, uniform_specs

from lmserve.bench_workload import RequestSpec


def run(engine: object, specs: list[RequestSpec], clients: int) -> dict[str, float]:
    from lmserve_server.continuous import DecodeBatch, Row
    from lmserve_server.engine import Engine
    from lmserve_server.types import GenerationRequest

    assert isinstance(engine, Engine)
    todo = collections.deque(
        GenerationRequest(tuple(engine.tokenize(s.prompt)), s.max_new_tokens) for s in specs
    )
    batch = DecodeBatch(engine, max_rows=clients)
    figures = collections.Counter[str]()
    started = time.perf_counter()
    while todo or len(batch):
        joining = []
        while todo and len(batch) + len(joining) < clients:  # a finished caller sends again
            joining.append(Row(request=todo.popleft(), generator=None))
        step_started = time.perf_counter()
        done = batch.step(joining)
        kind = "admitting" if joining else "decoding"
        figures[f"{kind}_steps"] += 1
        figures[f"{kind}_s"] += time.perf_counter() - step_started
        figures["tokens"] += sum(len(r.tokens) for r in done)
    figures["seconds"] = time.perf_counter() - started
    return dict(figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--plain-weights", action="store_true", help="as --pack-weights false does: no packing"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from lmserve_server.engine import Engine, EngineConfig

    engine = Engine.load(
        EngineConfig(model=args.model, device=args.device, pack_weights=not args.plain_weights)
    )
    run(engine, mixed_specs()[:4], args.clients)  # warm-up
    for name, specs in (("mixed", mixed_specs()), ("uniform", uniform_specs())):
        for _ in range(args.repeats):
            f = run(engine, specs, args.clients)
            print(
                f"{name:>7}: {f['tokens'] / f['seconds']:6.1f} tok/s, {f['seconds']:5.2f} s, "
                f"{f.get('decoding_steps', 0):.0f} decode steps "
                f"({1000 * f.get('decoding_s', 0) / max(f.get('decoding_steps', 1), 1):.1f} ms "
                f"each), {f.get('admitting_steps', 0):.0f} admitting steps "
                f"({f.get('admitting_s', 0):.2f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
