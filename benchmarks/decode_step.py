"""One decode step of R rows at a fixed context, in-process, on whichever engine is importable.

    PYTHONPATH=server python benchmarks/decode_step.py --model DIR --rows 16 64 --context 256

For each ``--rows``: a runner with that many rows, each at ``--context`` tokens (the KV cache
holds zeros there: a decode step's cost does not depend on the values), and ``--steps``
decode-only steps of all the rows through ``ModelRunner.execute``; prints the median step
(the engine thread's CPU time with one torch thread, so that other work on a shared machine
does not count) as JSON lines. Run it alternately against two checkouts (``--label``) to
compare KV layouts side by side; it works with the slot cache (``slot_tokens``) and the
paged pool (``kv_tokens``, block tables).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)

    import torch

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine.model import Engine
    from lmserve_server.engine.runner import Chunk
    from lmserve_server.engine.types import GenerationRequest

    torch.set_num_threads(1)
    engine = Engine.load(EngineConfig(model=args.model, device="cpu"))
    paged = "kv_tokens" in inspect.signature(engine.continuous_runner).parameters
    block = 32
    per_row = -(-(args.context + 1) // block) * block
    for rows in args.rows:
        if paged:
            runner = engine.continuous_runner(
                slots=rows, kv_tokens=rows * per_row, max_step_tokens=rows + 1
            )
        else:
            runner = engine.continuous_runner(
                slots=rows, slot_tokens=per_row, max_step_tokens=rows + 1
            )
        request = GenerationRequest((1, 2), 4)
        chunks = []
        for row in range(rows):
            runner.sampling.admit(row, request, seed=row)
            blocks = tuple(range(row * per_row // block, (row + 1) * per_row // block))
            extra = {"blocks": blocks} if paged else {}
            chunks.append(Chunk(row, (1000 + row,), args.context, True, **extra))
        times = []
        for _ in range(args.steps):
            started = time.thread_time()
            runner.execute(chunks)
            times.append(time.thread_time() - started)
        print(
            json.dumps(
                {
                    "label": args.label,
                    "rows": rows,
                    "context": args.context,
                    "step_ms": 1000 * statistics.median(times[2:]),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
