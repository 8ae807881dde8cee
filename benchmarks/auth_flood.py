"""Health and an authorised call while clients without a token flood the daemon with big
requests: does the token check spare the daemon the work of reading them?

    python benchmarks/auth_flood.py --model models/tiny-gpt2 [--seconds 20]

Starts a real ``lmserve serve`` with a bearer token, times health checks and a 1-token
authorised ``Generate`` while it is quiet, then again while ``--clients`` processes send
``GenerateRequest``s of ``--megabytes`` MB without a token as fast as they are refused, and
prints the p50 and max of each, and the ratio flood / quiet.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, say

TOKEN = "flood-test-token"


def flood(address: str, megabytes: float, in_flight: int, refused: Any) -> None:
    """One client without a token: ``in_flight`` big Generate calls at all times, counting
    the refusals."""
    import grpc

    from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc

    request = lmserve_pb2.GenerateRequest(prompt="x" * int(megabytes * 1_000_000))
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = lmserve_pb2_grpc.GeneratorStub(channel)
        calls = [stub.Generate.future(request, timeout=30) for _ in range(in_flight)]
        while True:
            for i, call in enumerate(calls):
                if call.done():
                    if call.code() == grpc.StatusCode.UNAUTHENTICATED:
                        with refused.get_lock():
                            refused.value += 1
                    calls[i] = stub.Generate.future(request, timeout=30)
            time.sleep(0.001)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(calls: int, call: object) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``call``, 20 ms apart."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)
    return times


def measure(address: str, calls: int) -> dict[str, list[float]]:
    from lmserve import Client

    with Client(address, token=TOKEN, timeout=60) as client:
        health = timed(calls, client.health)
        generate = timed(max(5, calls // 10), lambda: client.generate("Hi", max_new_tokens=1))
    return {"health": health, "generate": generate}


def summary(name: str, quiet: list[float], loud: list[float]) -> str:
    q, f = statistics.median(quiet), statistics.median(loud)
    return (
        f"{name}: quiet p50 {q:.1f} ms (max {max(quiet):.1f}), flood p50 {f:.1f} ms "
        f"(max {max(loud):.1f}): x{f / q:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--megabytes", type=float, default=3.9)
    parser.add_argument("--in-flight", type=int, default=8, help="calls at once per client")
    parser.add_argument("--calls", type=int, default=100, help="health checks per phase")
    parser.add_argument("--flags", default="", help="more lmserve serve flags, one string")
    args = parser.parse_args(argv)
    os.environ["LMSERVE_AUTH_TOKEN"] = TOKEN
    setup = Setup(model=args.model, daemon_flags=tuple(args.flags.split()))
    with daemon(setup) as address:
        import harness

        (pid,) = (p.pid for p in harness._LIVE if p.poll() is None)
        measure(address, 10)  # warm the channel and the model
        quiet = measure(address, args.calls)
        refused = multiprocessing.Value("l", 0)
        procs = [
            multiprocessing.Process(
                target=flood,
                args=(address, args.megabytes, args.in_flight, refused),
            )
            for _ in range(args.clients)
        ]
        for proc in procs:
            proc.start()
        try:
            time.sleep(3)  # let the flood get going
            before, started, cpu = refused.value, time.monotonic(), cpu_s(pid)
            loud = measure(address, args.calls)
            count = refused.value - before
            rate = count / (time.monotonic() - started)
            cpu_ms = (cpu_s(pid) - cpu) * 1000 / max(count, 1)
        finally:
            for proc in procs:
                proc.terminate()
                proc.join(10)
    say(
        f"flood: {args.clients} clients, {args.in_flight} calls in flight each, "
        f"{args.megabytes} MB a call, {rate:.1f} refused/s, daemon CPU {cpu_ms:.2f} ms a "
        "refusal (the health checks' and generates' included)"
    )
    say(summary("health", quiet["health"], loud["health"]))
    say(summary("authorised 1-token Generate", quiet["generate"], loud["generate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
