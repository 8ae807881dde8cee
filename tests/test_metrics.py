"""Prometheus /metrics of a real daemon, scraped over HTTP after real gRPC calls."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import lmserve
from lmserve import Client
from lmserve_server.cli import build_parser, config_from_args
from lmserve_server.config import ServerConfig
from tests.conftest import RunningDaemon
from tests.ops_support import free_port, scrape


def occupy(running: RunningDaemon, tokens: int = 300, **client_kwargs: object) -> threading.Thread:
    """One long request keeps the engine busy, so what is sent meanwhile waits in the queue."""
    thread = threading.Thread(
        target=lambda: Client(running.address, **client_kwargs).generate(  # type: ignore[arg-type]
            "blocker", max_new_tokens=tokens
        )
    )
    thread.start()
    wait_for(lambda: running.daemon.scheduler.busy, "the blocking request never started")
    return thread


def wait_for(condition, message: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.001)


def test_metrics_count_calls_batches_tokens_and_queue(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    running = make_daemon(metrics_port=port)
    assert running.daemon.metrics.port == port
    client = Client(running.address, timeout=60)
    for _ in range(3):
        assert client.generate("Hello", max_new_tokens=5).completion_tokens == 5
    assert client.tokenize("Hello World") == [15496, 2159]
    with pytest.raises(lmserve.InvalidArgumentError):
        client.generate("Hello", max_new_tokens=5000)

    blocker = occupy(running, tokens=150)
    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(client.generate, "Hi", max_new_tokens=3) for _ in range(4)]
        wait_for(lambda: running.daemon.scheduler.queue_depth == 4, "the 4 calls never queued")
        assert scrape(port)[("lmserve_queue_depth", ())] == 4  # sampled at scrape time
        assert [r.result().batch_size for r in results] == [4] * 4
    blocker.join()

    m = scrape(port)
    ok = ("lmserve_requests_total", (("code", "OK"), ("method", "Generate")))
    assert m[ok] == 3 + 1 + 4
    assert (
        m[("lmserve_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Generate")))] == 1
    )
    assert m[("lmserve_requests_total", (("code", "OK"), ("method", "Tokenize")))] == 1
    assert m[("lmserve_generated_tokens_total", ())] == 3 * 5 + 150 + 4 * 3
    # Batches: three alone, the blocker alone, then the four together.
    assert m[("lmserve_batch_size_count", ())] == 5
    assert m[("lmserve_batch_size_sum", ())] == 8
    assert m[("lmserve_batch_size_bucket", (("le", "1.0"),))] == 4
    assert m[("lmserve_batch_size_bucket", (("le", "4.0"),))] == 5
    assert m[("lmserve_batch_compute_seconds_count", ())] == 5
    assert m[("lmserve_batch_compute_seconds_sum", ())] > 0
    assert m[("lmserve_batch_failures_total", ())] == 0
    # Queue time is per successful Generate; the four waited behind the blocker.
    assert m[("lmserve_queue_seconds_count", ())] == 8
    assert m[("lmserve_queue_seconds_sum", ())] > 0
    assert m[("lmserve_request_duration_seconds_count", (("method", "Generate"),))] == 9
    assert m[("lmserve_request_duration_seconds_count", (("method", "Tokenize"),))] == 1
    assert m[("lmserve_queue_depth", ())] == 0
    info = (("device", "cpu"), ("dtype", "float32"), ("model", running.daemon.engine.name))
    assert m[("lmserve_model_info", info)] == 1
    client.close()


def test_refusals_are_counted_and_daemons_keep_their_own_series(make_daemon) -> None:  # type: ignore[no-untyped-def]
    first_port, second_port = free_port(), free_port()
    first = make_daemon(metrics_port=first_port, max_queue=1, max_batch_size=1, auth_token="t0k")
    second = make_daemon(metrics_port=second_port)

    blocker = occupy(first, token="t0k")
    waiting = ThreadPoolExecutor(1).submit(
        Client(first.address, token="t0k").generate, "Hi", max_new_tokens=2
    )
    wait_for(lambda: first.daemon.scheduler.queue_depth == 1, "the second call never queued")
    with pytest.raises(lmserve.OverloadedError):
        Client(first.address, token="t0k").generate("Hi", max_new_tokens=2)
    with pytest.raises(lmserve.UnauthenticatedError):
        Client(first.address).generate("Hi", max_new_tokens=2)
    assert scrape(first_port)[("lmserve_queue_depth", ())] == 1
    blocker.join()
    assert waiting.result().completion_tokens == 2
    Client(second.address).tokenize("x")
    chunks = list(Client(second.address).stream("Hi", max_new_tokens=3))
    assert chunks[-1].finish_reason is not None

    m = scrape(first_port)
    count = "lmserve_requests_total"
    assert m[(count, (("code", "OK"), ("method", "Generate")))] == 2
    assert m[(count, (("code", "RESOURCE_EXHAUSTED"), ("method", "Generate")))] == 1
    assert m[(count, (("code", "UNAUTHENTICATED"), ("method", "Generate")))] == 1
    assert (count, (("code", "OK"), ("method", "Tokenize"))) not in m

    m = scrape(second_port)
    assert m[(count, (("code", "OK"), ("method", "Tokenize")))] == 1
    assert m[(count, (("code", "OK"), ("method", "GenerateStream")))] == 1
    assert m[("lmserve_generated_tokens_total", ())] == 3
    assert (count, (("code", "OK"), ("method", "Generate"))) not in m


def test_metrics_endpoint_is_off_by_default_and_stops_with_the_daemon(make_daemon) -> None:  # type: ignore[no-untyped-def]
    assert make_daemon().daemon.metrics.port == 0
    port = free_port()
    running = make_daemon(metrics_port=port)
    assert ("lmserve_queue_depth", ()) in scrape(port)
    running.stop()
    with pytest.raises(OSError):
        scrape(port)


def test_a_taken_metrics_port_is_a_clear_error(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    make_daemon(metrics_port=port)
    with pytest.raises(OSError, match=f"--metrics-port {port}: cannot listen on 127.0.0.1"):
        make_daemon(metrics_port=port)


def test_metrics_listen_on_loopback_unless_told_otherwise(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """--host 0.0.0.0 opens the gRPC port to the network, not /metrics."""
    port = free_port()
    make_daemon(host="0.0.0.0", metrics_port=port)
    assert ("lmserve_queue_depth", ()) in scrape(port)
    with socket.socket() as other:  # another loopback address is free: 127.0.0.1 alone
        other.bind(("127.0.0.2", port))

    port = free_port()
    make_daemon(metrics_port=port, metrics_host="0.0.0.0")
    assert ("lmserve_queue_depth", ()) in scrape(port)
    with socket.socket() as other, pytest.raises(OSError):  # every address is taken
        other.bind(("127.0.0.2", port))


def test_metrics_host_is_a_flag_and_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*argv: str) -> ServerConfig:
        return config_from_args(build_parser().parse_args(["serve", *argv]))

    assert (parse().metrics_host, parse("--host", "0.0.0.0").metrics_host) == ("127.0.0.1",) * 2
    assert parse("--metrics-host", "0.0.0.0").metrics_host == "0.0.0.0"
    monkeypatch.setenv("LMSERVE_METRICS_HOST", "::")
    assert parse().metrics_host == "::"


def test_streams_record_first_token_gaps_queue_time_and_prompt_tokens(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    running = make_daemon(metrics_port=port)
    with Client(running.address, timeout=60) as client:
        chunks = list(client.stream("Hello world", max_new_tokens=6))  # 2 prompt tokens
        assert chunks[-1].finish_reason is lmserve.FinishReason.LENGTH  # 6 tokens, no EOS
        assert sum(len(c.token_ids) for c in chunks) == 6
        assert client.generate("Hello", max_new_tokens=3).completion_tokens == 3  # 1 token
        with pytest.raises(lmserve.InvalidArgumentError):  # refused: never served
            list(client.stream("Hello", max_new_tokens=5000))

    m = scrape(port)
    assert m[("lmserve_prompt_tokens_total", ())] == 2 + 1
    assert m[("lmserve_queue_seconds_count", ())] == 2  # the stream's and the unary call's
    assert m[("lmserve_time_to_first_token_seconds_count", ())] == 1
    assert m[("lmserve_inter_token_latency_seconds_count", ())] == 6 - 1
    first, gaps = (
        m[("lmserve_time_to_first_token_seconds_sum", ())],
        m[("lmserve_inter_token_latency_seconds_sum", ())],
    )
    assert first > 0 and gaps > 0
    wait_for(
        lambda: (
            ("lmserve_request_duration_seconds_sum", (("method", "GenerateStream"),))
            in scrape(port)
        ),
        "the stream's duration was never recorded",
    )
    streamed = scrape(port)[
        ("lmserve_request_duration_seconds_sum", (("method", "GenerateStream"),))
    ]
    assert first + gaps <= streamed  # both within the stream calls' time
