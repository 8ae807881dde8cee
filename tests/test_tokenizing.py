"""Tokenizing is bounded and stays off the event loop: Tokenize has the prompt's length limit,
and while big inputs are tokenized and refused, health still answers at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lmserve
from lmserve import Client
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from tests.conftest import RunningDaemon
from tests.ops_support import ServeProcess


def test_tokenize_has_the_prompt_length_limit(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running: RunningDaemon = make_daemon(max_prompt_chars=1000)
    with Client(running.address, timeout=30) as client:
        assert len(client.tokenize("a" * 1000)) > 0
        with pytest.raises(lmserve.InvalidArgumentError) as err:
            client.tokenize("a" * 1001)
        assert err.value.details == (
            "text: 1001 characters, at most 1000 allowed (--max-prompt-chars)"
        )
        assert client.tokenize("Hello World") == [15496, 2159]


def test_health_answers_while_big_inputs_are_tokenized_and_refused(tiny_model_dir: Path) -> None:
    """The issue's load, three times over: four 4 MB Tokenize calls (refused by length) and
    sixteen 100k-character prompts that tokenize to far more than the context (refused after
    ~0.2 s of tokenizing each), all at once. On the event loop they held health checks for
    up to 10 s (the liveness probe allows 5 s)."""
    server = ServeProcess(tiny_model_dir, "--port", "0")
    try:
        address = server.wait_serving()
        tokenize = lmserve_pb2.TokenizeRequest(text="a" * 4_000_000)
        generate = lmserve_pb2.GenerateRequest(prompt="\U0001f600" * 100_000)
        with grpc.insecure_channel(address) as channel:
            stub = lmserve_pb2_grpc.GeneratorStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            health.Check(check, timeout=30)  # connected before timing

            def status_of(method: grpc.UnaryUnaryMultiCallable, request: object) -> str:
                try:
                    method(request, timeout=120)
                except grpc.RpcError as err:
                    return str(err.code().name)  # type: ignore[attr-defined]
                return "OK"

            codes: list[str] = []
            latencies: list[float] = []
            with ThreadPoolExecutor(20) as pool:
                for _ in range(3):
                    calls = [pool.submit(status_of, stub.Tokenize, tokenize) for _ in range(4)]
                    calls += [pool.submit(status_of, stub.Generate, generate) for _ in range(16)]
                    while not all(call.done() for call in calls):
                        started = time.perf_counter()
                        reply = health.Check(check, timeout=30)
                        latencies.append(time.perf_counter() - started)
                        assert reply.status == health_pb2.HealthCheckResponse.SERVING
                        time.sleep(0.01)
                    codes += [call.result() for call in calls]
        latencies.sort()
        p50, p90, worst = (
            latencies[len(latencies) // 2],
            latencies[len(latencies) * 9 // 10],
            latencies[-1],
        )
        print(f"health over {len(latencies)} checks: p50 {p50 * 1000:.1f} ms, ", end="")
        print(f"p90 {p90 * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
        assert p90 < 0.1, latencies
        assert worst < 1.0, latencies
        assert set(codes) == {"INVALID_ARGUMENT"}
    finally:
        server.kill()
