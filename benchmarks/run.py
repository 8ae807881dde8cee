"""``make bench``: lmserve's benchmark suite; every figure a ratio measured side by side.

    python benchmarks/run.py --model models/gpt2-random            # the CPU suite
    python benchmarks/run.py --model models/gpt2-random --device cuda --dtype float16
    python benchmarks/run.py --model models/tiny-gpt2 --quick      # does the script work?

The model is a GPT-2 124M with random weights (``lmserve make-test-model DIR --size gpt2``,
written on the spot when DIR is missing, so a bare GPU machine needs only this repository):
the real model's compute, no download. Each figure prints its ratio, its target and
PASS/MISS as it is measured, then a Markdown summary for BENCHMARKS.md; everything
measured (every sample) goes to a JSON file under bench-results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Run as a script: the sibling modules (harness, figures) are importable from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import batching, overhead
from figures_load import mixed, scaling
from harness import QUICK, QUIET, InProcess, Row, Setup, Sizes, say, stop_all_daemons

FIGURES = (1, 3, 4, 5)  # figure 2 comes out of figure 1's legs


def _machine(setup: Setup) -> dict[str, Any]:
    def run(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return ""

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in run("lscpu").splitlines()
            if "Model name" in line
        ),
        platform.processor(),
    )
    import torch

    info: dict[str, Any] = {
        "date": run("date").strip(),
        "nproc": run("nproc").strip(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": run("git", "rev-parse", "--short", "HEAD").strip(),
        "device": setup.device,
        "dtype": setup.dtype,
    }
    if setup.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/gpt2-random", help="checkpoint directory")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float16, ..."
    )
    parser.add_argument(
        "--only", default="", help="comma-separated figures to run: 1 (with 2), 3, 4, 5"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--reps", type=int, help="repetitions (best of) for figures 1, 2, 5")
    parser.add_argument("--pairs", type=int, help="figure 3: request pairs per size")
    parser.add_argument(
        "--rates",
        help="figure 4: offered rates, e.g. 1,2,4 (default: 25, "
        "50 and 100%% of the measured capacity)",
    )
    parser.add_argument("--mixed-requests", type=int, help="figure 4: requests per rate")
    parser.add_argument(
        "--daemon-flags",
        default="",
        help="more 'lmserve serve' flags for every daemon, e.g. '--warm-up false'",
    )
    parser.add_argument("--out", help="JSON results (default: bench-results/<time>.json)")
    return parser.parse_args(argv)


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, Any] = {}
    if args.reps:
        changes["reps"] = args.reps
    if args.pairs:
        changes["overhead_pairs"] = args.pairs
    if args.rates:
        changes["mixed_rates"] = tuple(float(r) for r in args.rates.split(","))
    if args.mixed_requests:
        changes["mixed_requests"] = args.mixed_requests
    return dataclasses.replace(sizes, **changes)


def _markdown(rows: list[Row]) -> str:
    lines = ["| # | figure | measured | target | verdict |", "| - | - | - | - | - |"]
    for row in rows:
        value = f"{row['value']:.3f}" if abs(row["value"]) < 100 else f"{row['value']:.0f}"
        lines.append(
            f"| {row['figure']} | {row['what']} | {value} | {row['target']} | {row['verdict']} |"
        )
    return "\n".join(lines)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: stop the daemons, then exit at once. Raising SystemExit instead is not
    enough: raised inside a gRPC callback of the load tester it is swallowed."""
    stop_all_daemons()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = _parse(argv)
    setup = Setup(args.model, args.device, args.dtype, tuple(shlex.split(args.daemon_flags)))
    sizes = _sizes(args)
    only = {int(f) for f in args.only.split(",") if f} or set(FIGURES)
    if not Path(args.model).is_dir():
        from lmserve_server.testmodel import write_test_model

        say(f"writing a random-weight GPT-2 124M to {args.model}")
        write_test_model(args.model, size="gpt2")
    machine = _machine(setup)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    say(f"lmserve benchmarks, {machine['date']}")
    say(f"machine: {machine['nproc']} CPUs, {machine['cpu']}, torch {machine['torch']}")
    if "gpu" in machine:
        say(f"gpu: {machine['gpu']}")
    say(f"command: {command}")
    say(f"sizes: {sizes}")
    started = time.monotonic()
    local = InProcess(setup)
    rows: list[Row] = []
    if 1 in only or 2 in only:
        say("\n== 1, 2: batching gain and serving efficiency ==")
        rows += batching(setup, local, sizes)
    if 3 in only:
        say("\n== 3: overhead at low load ==")
        rows += overhead(setup, local, sizes)
    if 5 in only:
        say("\n== 5: tokens/s by batch size ==")
        rows += scaling(setup, local, sizes)
    if 4 in only:
        del local  # figure 4 has no in-process side; give its memory back
        say("\n== 4: mixed workload, open loop ==")
        rows += mixed(setup, sizes)
    elapsed = time.monotonic() - started
    say(f"\n== summary ({elapsed / 60:.1f} min) ==")
    say(
        f"waited {QUIET['waited_s']:.0f} s in all for a quiet machine; "
        f"{QUIET['started_busy']} legs started while it was still busy"
    )
    say(_markdown(rows))
    out = Path(args.out or f"bench-results/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine,
        "command": command,
        "cwd": os.getcwd(),
        "sizes": dataclasses.asdict(sizes),
        "elapsed_s": elapsed,
        "quiet": QUIET,
        "rows": rows,
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
