"""Why the daemon's engine ran slower than the same engine in-process (BENCHMARKS.md).

PyTorch's CPU ops run on an OpenMP thread team, and each OS thread that calls torch gets a
team of its own. Once a second thread has called torch, the teams together have more
threads than this machine has cores, and OpenMP stops spinning between parallel regions
and sleeps instead; every small op of a decode step then pays a wake-up. The daemon warms
the model up on one thread (``asyncio.to_thread``) and runs batches on another (its engine
executor), so it is always in that state. This script shows it without any daemon:

    python benchmarks/threads.py --model models/gpt2-random

It times batch-1 decodes on the engine thread alone, then again after one call from
another thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import InProcess, Setup, fixed_specs, say, wait_for_quiet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/gpt2-random")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    engine_thread = ThreadPoolExecutor(1)
    other_thread = ThreadPoolExecutor(1)
    local = engine_thread.submit(InProcess, Setup(args.model)).result()  # load + warm-up
    spec = fixed_specs(1, 16, args.new_tokens)[0]

    def p50_ms() -> float:
        wait_for_quiet()
        calls = [
            engine_thread.submit(local.generate, [spec]).result()[0] for _ in range(args.calls)
        ]
        return statistics.median(calls) * 1000

    alone = p50_ms()
    other_thread.submit(local.generate, [spec]).result()  # one call from another thread
    after = p50_ms()
    say(f"batch 1, {args.new_tokens} new tokens, p50 of {args.calls} calls on the engine thread:")
    say(f"  only that thread has used torch:      {alone:.1f} ms")
    say(f"  after one call from another thread:   {after:.1f} ms ({after / alone:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
