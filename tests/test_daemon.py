"""The daemon end to end: a real grpc.aio server on loopback serving a real checkpoint,
called through the real client. Every promise of the API is checked with both schedulers
(static: one generate per batch; continuous: rows join and leave between decode steps);
the tests of how static batches form say so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lmserve
from lmserve import Client, FinishReason
from lmserve_server.config import EngineConfig, ServerConfig
from tests.conftest import RunningDaemon
from tests.test_engine import PROMPTS


@pytest.fixture(scope="module", params=["static", "continuous"])
def daemon_config(request: pytest.FixtureRequest, tiny_model_dir: Path) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(model=str(tiny_model_dir)),
        port=0,
        max_wait_ms=20,
        max_queue=64,
        scheduler=request.param,
    )


def static_only(running: RunningDaemon) -> None:
    if running.daemon.config.scheduler != "static":
        pytest.skip("how static batches form")


def batched(results: list[lmserve.GenerationResult], running: RunningDaemon, size: int) -> bool:
    """Whether ``results`` came from ``size`` requests that ran in one batch, as
    ``run_together`` sends them. Static: one ``generate`` of exactly ``size`` rows.
    Continuous: all ``size`` joined the running batch in the same step, beside the blocker,
    so each was admitted into a batch of ``size + 1`` rows; had any joined a step earlier or
    later, it (or the others) would report fewer."""
    sizes = {r.batch_size for r in results}
    if running.daemon.config.scheduler == "static":
        return sizes == {size}
    return sizes == {size + 1}


@pytest.fixture
def client(daemon: RunningDaemon) -> Client:
    with Client(daemon.address, timeout=60) as c:
        yield c


def occupy_engine(running: RunningDaemon, tokens: int = 150) -> threading.Thread:
    """Keeps the engine busy with one long request, so that what is sent meanwhile queues."""
    thread = threading.Thread(
        target=lambda: Client(running.address).generate("blocker", max_new_tokens=tokens)
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not running.daemon.scheduler.busy:
        assert time.monotonic() < deadline, "the blocking request never started"
        time.sleep(0.001)
    return thread


@contextmanager
def decode_thread_held(running: RunningDaemon) -> Iterator[None]:
    """Continuous mode: holds the decode thread at the end of its current step (where it
    reports the step to the daemon's metrics) until the block exits, so that requests sent
    meanwhile wait together and join the running batch in one step."""
    metrics = running.daemon.metrics
    report_step = metrics.observe_batch
    release = threading.Event()

    def report_then_wait(*args: Any, **kwargs: Any) -> None:
        report_step(*args, **kwargs)
        release.wait(timeout=120)  # a failed test must not leave the daemon stuck for good

    metrics.observe_batch = report_then_wait  # type: ignore[method-assign]
    try:
        yield
    finally:
        release.set()
        del metrics.observe_batch  # the class's method again


T = TypeVar("T")


def run_together(running: RunningDaemon, calls: Sequence[Callable[[], T]]) -> list[T]:
    """Makes the calls (one request each) at once behind a blocking request, so that the
    daemon batches them all together, and returns their results in order.

    Static: they queue while the blocker's ``generate`` runs and form the next batch.
    Continuous: rows join between decode steps, so requests that arrive a few steps apart
    would join apart; the decode thread is held until every one of them waits, then they
    all join the blocker's running batch in the same step.
    """
    blocker = occupy_engine(running)
    with ThreadPoolExecutor(len(calls)) as pool:
        if running.daemon.config.scheduler == "static":
            futures = [pool.submit(call) for call in calls]
        else:
            with decode_thread_held(running):
                futures = [pool.submit(call) for call in calls]
                deadline = time.monotonic() + 60
                while running.daemon.scheduler.queue_depth < len(calls):
                    assert time.monotonic() < deadline, "the requests never all arrived"
                    time.sleep(0.001)
        results = [future.result() for future in futures]
    blocker.join()
    return results


def test_tokenize_gives_the_tutorial_figures(client: Client) -> None:
    assert client.tokenize("Hello World") == [15496, 2159]
    assert client.tokenize("<|endoftext|>") == [50256]


def test_model_info(client: Client, daemon: RunningDaemon) -> None:
    info = client.model_info()
    assert info.model == daemon.daemon.config.engine.model
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert (info.max_context, info.eos_token_id) == (1024, 50256)
    assert info.max_batch_size == 32
    assert info.max_new_tokens_cap == 1024 and info.default_max_new_tokens == 64
    if daemon.daemon.config.scheduler == "static":
        assert (info.scheduler, info.max_wait_ms) == ("static", 20)
        assert (info.kv_cache_tokens, info.max_step_tokens, info.max_batch_tokens) == (0, 0, 0)
        assert info.max_request_tokens == 1024
    else:  # no waiting to batch; a KV cache of a full context per row
        assert (info.scheduler, info.max_wait_ms) == ("continuous", None)
        assert (info.kv_cache_tokens, info.max_request_tokens) == (32 * 1024, 1024)
        assert info.max_step_tokens == 256


def test_generate_returns_the_continuation_and_how_it_was_served(client: Client) -> None:
    result = client.generate("The future of AI is", max_new_tokens=12)
    assert len(result.token_ids) == result.completion_tokens == 12
    assert result.prompt_tokens == 5
    assert result.finish_reason is FinishReason.LENGTH
    assert result.batch_size == 1
    assert result.queue_ms >= 0 and result.compute_ms > 0
    assert result.text and not result.text.startswith("The future of AI is")


def test_zero_max_new_tokens_means_the_server_default(client: Client) -> None:
    assert client.generate("Hello", max_new_tokens=0).completion_tokens == 64


def test_concurrent_prompts_are_batched_and_each_gets_its_own_tokens(
    client: Client, daemon: RunningDaemon
) -> None:
    alone = [client.generate(p, max_new_tokens=10) for p in PROMPTS]
    assert all(r.batch_size == 1 for r in alone)

    together = run_together(
        daemon, [lambda p=p: client.generate(p, max_new_tokens=10) for p in PROMPTS]
    )

    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert batched(together, daemon, len(PROMPTS)), [r.batch_size for r in together]
    assert len({r.token_ids for r in alone}) == len(PROMPTS), "distinct prompts, distinct text"


def test_mixed_max_new_tokens_share_a_batch(client: Client, daemon: RunningDaemon) -> None:
    limits = [1, 3, 8, 20, 5, 13]
    requests = list(zip(PROMPTS, limits, strict=False))
    alone = [client.generate(p, max_new_tokens=n) for p, n in requests]
    together = run_together(
        daemon, [lambda p=p, n=n: client.generate(p, max_new_tokens=n) for p, n in requests]
    )
    assert batched(together, daemon, len(limits)), [r.batch_size for r in together]
    assert [r.completion_tokens for r in together] == limits
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_mixed_sampling_settings_share_one_batch(client: Client, daemon: RunningDaemon) -> None:
    # Every sampling row is seeded, so each has one right answer: its result alone.
    kinds: list[dict[str, Any]] = [
        {},
        {"temperature": 0.8, "seed": 1},
        {"temperature": 1.2, "top_k": 5, "seed": 2},
        {"temperature": 1.0, "top_p": 0.5, "seed": 3},
        {"temperature": 0.7, "seed": 4},
    ]
    alone = [client.generate("Hello", max_new_tokens=12, **kw) for kw in kinds]
    results = run_together(
        daemon, [lambda kw=kw: client.generate("Hello", max_new_tokens=12, **kw) for kw in kinds]
    )
    assert batched(results, daemon, len(kinds)), [r.batch_size for r in results]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert [r.text for r in results] == [r.text for r in alone]
    assert len({r.token_ids for r in alone}) > 1, "the settings must make a difference"


def test_a_seeded_sample_does_not_depend_on_its_batch(
    client: Client, daemon: RunningDaemon
) -> None:
    seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 1234}
    alone = client.generate("The future of AI is", max_new_tokens=16, **seeded)
    assert alone.batch_size == 1
    others: list[Callable[[], lmserve.GenerationResult]] = [
        lambda p=p: client.generate(p, max_new_tokens=20, temperature=0.9) for p in PROMPTS[:5]
    ]
    *_, mixed_result = run_together(
        daemon,
        [*others, lambda: client.generate("The future of AI is", max_new_tokens=16, **seeded)],
    )
    assert batched([mixed_result], daemon, 6), mixed_result.batch_size
    assert mixed_result.token_ids == alone.token_ids
    other_seed = client.generate("The future of AI is", max_new_tokens=16, **{**seeded, "seed": 99})
    assert other_seed.token_ids != alone.token_ids


def test_stream_equals_unary_byte_for_byte(client: Client, daemon: RunningDaemon) -> None:
    blocker = occupy_engine(daemon)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = list(pool.map(lambda p: list(client.stream(p, max_new_tokens=30)), PROMPTS))
    blocker.join()
    for prompt, chunks in zip(PROMPTS, streams, strict=True):
        unary = client.generate(prompt, max_new_tokens=30)
        assert "".join(c.text for c in chunks) == unary.text
        assert tuple(t for c in chunks for t in c.token_ids) == unary.token_ids
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert len(chunks) > 5, "tokens must arrive as they are generated, not all at the end"


def test_stream_with_a_stop_string_never_sends_it(client: Client) -> None:
    full = client.generate("Once upon a time", max_new_tokens=30)
    stop = full.text[len(full.text) // 2 :][:4]
    chunks = list(client.stream("Once upon a time", max_new_tokens=30, stop=[stop]))
    text = "".join(c.text for c in chunks)
    assert text == full.text[: full.text.index(stop)]
    assert chunks[-1].finish_reason is FinishReason.STOP


def wait_idle(running: RunningDaemon, within_s: float) -> float:
    started = time.monotonic()
    while running.daemon.scheduler.busy:
        assert time.monotonic() - started < within_s, "the abandoned row kept the engine busy"
        time.sleep(0.005)
    return time.monotonic() - started


def test_a_stream_whose_client_leaves_stops_costing_work(
    client: Client, daemon: RunningDaemon
) -> None:
    stream = client.stream("Hello", max_new_tokens=1000)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()  # type: ignore[attr-defined]
    # 1000 tokens take several seconds here; the row must end within a few steps.
    wait_idle(daemon, within_s=2.0)


def test_a_call_past_its_deadline_stops_costing_work(client: Client, daemon: RunningDaemon) -> None:
    with pytest.raises(lmserve.DeadlineExceededError):
        client.generate("Hello", max_new_tokens=1000, timeout=0.3)
    wait_idle(daemon, within_s=2.0)
    assert client.generate("Hello", max_new_tokens=3).completion_tokens == 3


def test_stop_string(client: Client) -> None:
    full = client.generate("The future of AI is", max_new_tokens=20)
    stop = full.text[len(full.text) // 2 :][:3]
    cut = client.generate("The future of AI is", max_new_tokens=20, stop=[stop])
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"max_new_tokens": 5000}, "max_new_tokens"),
        ({"max_new_tokens": 1020, "prompt": "one two three four five six"}, "context"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["x"] * 17}, "stop"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    client: Client, kwargs: dict[str, object], field: str
) -> None:
    args = {"prompt": "Hello", "max_new_tokens": 4, **kwargs}
    with pytest.raises(lmserve.InvalidArgumentError) as err:
        client.generate(**args)  # type: ignore[arg-type]
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details
    assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2


def test_health_reports_serving_for_the_server_and_the_service(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lmserve.v1.Generator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"lmserve.v1.Generator", "grpc.health.v1.Health"} <= names


def test_full_queue_is_resource_exhausted(make_daemon, engine) -> None:  # type: ignore[no-untyped-def]
    small = make_daemon(max_queue=2, max_batch_size=1)
    blocker = occupy_engine(small, tokens=300)
    errors: list[Exception] = []

    def call() -> None:
        try:
            Client(small.address).generate("Hello", max_new_tokens=2)
        except lmserve.OverloadedError as err:
            errors.append(err)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(call)
    blocker.join()
    assert errors, "with 2 queue slots, some of 8 concurrent calls must be refused"
    assert all("queue is full" in e.details for e in errors)


def test_stop_drains_accepted_requests(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon()
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                Client(running.address).generate("Hello", max_new_tokens=200).completion_tokens
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(0.3)
    running.stop()
    for t in threads:
        t.join()
    assert results == [200] * 4


def test_a_queued_request_expires_at_its_deadline_and_is_never_computed(
    client: Client, daemon: RunningDaemon
) -> None:
    static_only(daemon)  # continuous admits at once; its running rows are tested above
    blocker = occupy_engine(daemon, tokens=400)
    with ThreadPoolExecutor(2) as pool:
        patient = pool.submit(client.generate, "patient", max_new_tokens=3)
        started = time.monotonic()
        with pytest.raises(lmserve.DeadlineExceededError):
            client.generate("hurried", max_new_tokens=3, timeout=0.3)
        waited = time.monotonic() - started
        still_busy = daemon.daemon.scheduler.busy
        assert patient.result().batch_size == 1, "the expired request must not be computed"
    blocker.join()
    assert still_busy, "it must expire while the engine is still busy, not when it frees"
    assert waited < 1.0


def test_batch_token_budget_splits_batches_and_refuses_a_request_over_it(
    make_daemon,  # type: ignore[no-untyped-def]
) -> None:
    # "prompt N" is 2 tokens; 2 + 8 new = 10 padded tokens a row; budget 35 -> 3 rows a batch.
    budgeted: RunningDaemon = make_daemon(max_batch_tokens=35)
    static_only(budgeted)
    with Client(budgeted.address) as c:
        with pytest.raises(lmserve.InvalidArgumentError, match="--max-batch-tokens"):
            c.generate("Hello", max_new_tokens=40)
        blocker_ok = c.generate("x", max_new_tokens=2)
        assert blocker_ok.completion_tokens == 2
        with ThreadPoolExecutor(7) as pool:
            blocker = pool.submit(c.generate, "blocker", max_new_tokens=30)
            deadline = time.monotonic() + 10
            while not budgeted.daemon.scheduler.busy:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            rows = [pool.submit(c.generate, f"prompt {i}", max_new_tokens=8) for i in range(6)]
            sizes = sorted(f.result().batch_size for f in rows)
            blocker.result()
    assert sizes == [3] * 6


def test_an_oversized_prompt_is_refused_before_tokenizing(make_daemon) -> None:  # type: ignore[no-untyped-def]
    small: RunningDaemon = make_daemon(max_prompt_chars=100, max_message_bytes=64 * 1024)
    with Client(small.address) as c:
        with pytest.raises(lmserve.InvalidArgumentError, match="--max-prompt-chars"):
            c.generate("x" * 101, max_new_tokens=1)
        with pytest.raises(lmserve.RequestTooLargeError):  # gRPC's own message-size limit
            c.generate("x" * 100_000, max_new_tokens=1)
        assert c.generate("x" * 100, max_new_tokens=1).completion_tokens == 1
