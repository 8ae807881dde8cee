"""The resident memory the packed layers' compiled kernels hold (``--pack-weights``).

    python benchmarks/packed_kernels.py --model models/gpt2-random

Loads the model as ``lmserve serve`` does (float32 on the CPU, weights packed), hands freed
heap back to the system (``malloc_trim``) so that the reading counts what is held, reads the
RSS, compiles every kernel (``Engine.warm_up_kernels``: each shape of packed layer at each of
the 27 row counts), trims and reads again. Prints the growth and its share per kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path

from lmserve_server.config import EngineConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.packing import ROW_BUCKETS, warm_up_packed


def held_mb() -> float:
    """This process's RSS in MiB once freed heap has gone back to the system (Linux)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    engine = Engine.load(EngineConfig(model=args.model))
    before = held_mb()
    shapes = warm_up_packed(engine.model)
    after = held_mb()
    kernels = shapes * len(ROW_BUCKETS)
    print(
        f"{args.model}: {shapes} shapes x {len(ROW_BUCKETS)} row counts = {kernels} kernels; "
        f"RSS {before:.0f} -> {after:.0f} MB: +{after - before:.1f} MB, "
        f"{(after - before) / max(kernels, 1):.2f} MB per kernel"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
