"""Faults inside the model: only the request that fails on its own gets an error, the rows
it ran with finish untouched (a stream among them never repeats a token), and the daemon
keeps serving. A real daemon and a real checkpoint in both schedulers, with a hook that
makes the model's forward fail on a chosen prompt (the failure is what's under test)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import lmserve
from lmserve import Client
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from tests.conftest import RunningDaemon

BAD, OOM, LATE = "poison pill", "memory hog", "slow poison"


class FaultyForward:
    """A forward pre-hook: a forward whose tokens hold BAD raises at once, OOM runs out of
    device memory (as CUDA would); a ``generate`` whose prompts hold LATE fails on its 5th
    forward, after its rows have made (and streamed) 4 tokens."""

    def __init__(self, engine: Engine) -> None:
        self.bad = engine.tokenize(BAD)
        self.oom = engine.tokenize(OOM)
        self.late = engine.tokenize(LATE)
        self.countdown: int | None = None
        self.forwards_with_bad = 0

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids: torch.Tensor = kwargs["input_ids"]
        rows = [row.tolist() for row in ids]
        if any(_holds(row, self.bad) for row in rows):
            self.forwards_with_bad += 1
            raise ValueError("the model choked on this prompt")
        if any(_holds(row, self.oom) for row in rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if ids.shape[1] > 1:  # a prefill: a new generate call, or a continuous step
            self.countdown = 4 if any(_holds(row, self.late) for row in rows) else None
        elif self.countdown is not None:
            self.countdown -= 1
            if self.countdown == 0:
                self.countdown = None
                raise RuntimeError("the model choked late")


def _holds(row: list[int], part: list[int]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


@pytest.fixture(scope="module")
def faulty_engine(tiny_model_dir: Path) -> Iterator[tuple[Engine, FaultyForward]]:
    """An engine of its own (the hook must not reach other tests' daemons)."""
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir)))
    hook = FaultyForward(engine)
    handle = engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    yield engine, hook
    handle.remove()


@pytest.fixture(params=["static", "continuous"])
def faulty(
    request: pytest.FixtureRequest,
    faulty_engine: tuple[Engine, FaultyForward],
    daemon_config: ServerConfig,
) -> Iterator[RunningDaemon]:
    from dataclasses import replace

    config = replace(daemon_config, scheduler=request.param, max_step_tokens=64)
    running = RunningDaemon(config, faulty_engine[0])
    yield running
    running.stop()


def call(client: Client, prompt: str, n: int = 6) -> lmserve.GenerationResult | Exception:
    try:
        return client.generate(prompt, max_new_tokens=n)
    except lmserve.LmserveError as err:
        return err


def test_only_the_failing_request_fails(faulty: RunningDaemon) -> None:
    prompts = ["Hello", BAD, "The future of AI is", "x", OOM, "gRPC"]
    with Client(faulty.address, timeout=60) as client:
        alone = {p: client.generate(p, max_new_tokens=6) for p in prompts if p not in (BAD, OOM)}
        # A long request runs while the others queue, so they start together (static: one
        # batch; continuous: they join its running batch in one step).
        with ThreadPoolExecutor(len(prompts) + 1) as pool:
            blocker = pool.submit(client.generate, "blocker", max_new_tokens=200)
            _wait_busy(faulty)
            results = dict(zip(prompts, pool.map(lambda p: call(client, p), prompts), strict=True))
            blocked = blocker.result()
        bad, oom = results.pop(BAD), results.pop(OOM)
        assert isinstance(bad, lmserve.InternalError), bad
        assert "the model choked on this prompt" in bad.details
        assert isinstance(oom, lmserve.OverloadedError), oom
        assert "out of device memory" in oom.details
        for prompt, result in results.items():
            assert isinstance(result, lmserve.GenerationResult), result
            assert result.token_ids == alone[prompt].token_ids
            assert result.batch_size >= 2, "it ran in company with the faulty ones"
        assert blocked.token_ids == client.generate("blocker", max_new_tokens=200).token_ids
        assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2


def test_a_stream_in_a_failed_batch_finishes_and_never_repeats_a_token(
    faulty: RunningDaemon, faulty_engine: tuple[Engine, FaultyForward]
) -> None:
    """Static: LATE fails its batch after 4 tokens, and the stream's row, retried apart,
    continues after the tokens it already sent. Continuous: BAD joins the stream's running
    batch, the step fails, and the stream's half of it runs again."""
    poison = LATE if faulty.daemon.config.scheduler == "static" else BAD
    with Client(faulty.address, timeout=60) as client:
        expected = client.generate("Once upon a time", max_new_tokens=24)
        started = threading.Event()
        chunks: list[lmserve.StreamChunk] = []

        def stream() -> None:
            for chunk in client.stream("Once upon a time", max_new_tokens=24):
                chunks.append(chunk)
                started.set()

        with ThreadPoolExecutor(3) as pool:
            if faulty.daemon.config.scheduler == "static":
                blocker = pool.submit(client.generate, "blocker", max_new_tokens=40)
                _wait_busy(faulty)
                streamed = pool.submit(stream)
                failed = pool.submit(call, client, poison, 24)
                blocker.result()
            else:
                streamed = pool.submit(stream)
                assert started.wait(30)
                failed = pool.submit(call, client, poison, 24)
            streamed.result()
            assert isinstance(failed.result(), lmserve.LmserveError)
    assert "".join(c.text for c in chunks) == expected.text
    assert tuple(t for c in chunks for t in c.token_ids) == expected.token_ids
    assert chunks[-1].finish_reason is expected.finish_reason


def _wait_busy(running: RunningDaemon) -> None:
    import time

    deadline = time.monotonic() + 10
    while not running.daemon.scheduler.busy:
        assert time.monotonic() < deadline, "the blocking request never started"
        time.sleep(0.001)
