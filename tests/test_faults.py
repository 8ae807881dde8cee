"""Faults inside generate: only the request that fails on its own gets an error, and the
daemon keeps serving. A real daemon and a real checkpoint, with an engine that fails on a
chosen prompt (the failure is what's under test, not the model)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lmserve
from lmserve import Client
from lmserve_server.config import ServerConfig
from lmserve_server.engine import Engine
from lmserve_server.types import GenerationOutput, GenerationRequest
from tests.conftest import RunningDaemon
from tests.test_daemon import occupy_engine

BAD, OOM = "poison pill", "memory hog"


class FailingEngine(Engine):
    """The real engine, except that a batch holding BAD raises, and one holding OOM runs
    out of device memory (as CUDA would), in company or alone."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.model, engine.tokenizer, engine.name)
        self.bad = tuple(engine.tokenize(BAD))
        self.oom = tuple(engine.tokenize(OOM))
        self.batch_sizes: list[int] = []

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        self.batch_sizes.append(len(requests))
        prompts = {r.prompt_ids for r in requests}
        if self.bad in prompts:
            raise ValueError("the model choked on this prompt")
        if self.oom in prompts:
            # Goes through the engine's own OOM handling, as a real CUDA OOM would.
            original = self.model.generate
            self.model.generate = _raise_oom  # type: ignore[method-assign]
            try:
                return super().generate_batch(requests)
            finally:
                self.model.generate = original  # type: ignore[method-assign]
        return super().generate_batch(requests)


def _raise_oom(*args: object, **kwargs: object) -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def failing(daemon_config: ServerConfig, engine: Engine) -> Iterator[RunningDaemon]:
    running = RunningDaemon(daemon_config, FailingEngine(engine))
    yield running
    running.stop()


def test_only_the_failing_request_fails(failing: RunningDaemon) -> None:
    prompts = ["Hello", BAD, "The future of AI is", "x", OOM, "gRPC"]
    with Client(failing.address) as client:
        alone = {p: client.generate(p, max_new_tokens=5) for p in prompts if p not in (BAD, OOM)}

        def call(prompt: str) -> object:
            try:
                return client.generate(prompt, max_new_tokens=5)
            except lmserve.LmserveError as err:
                return err

        engine: FailingEngine = failing.daemon.engine  # type: ignore[assignment]
        # Cleared before the blocker is sent: occupy_engine returns once the batcher is busy,
        # which can be before the engine thread has appended the blocker's batch.
        engine.batch_sizes.clear()
        blocker = occupy_engine(failing)
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = dict(zip(prompts, pool.map(call, prompts), strict=True))
        blocker.join()
        assert engine.batch_sizes[:2] == [1, len(prompts)], "the blocker, then one batch of all"

        bad, oom = results.pop(BAD), results.pop(OOM)
        assert isinstance(bad, lmserve.InternalError)
        assert "the model choked on this prompt" in bad.details
        assert isinstance(oom, lmserve.OverloadedError)
        assert "out of device memory" in oom.details
        for prompt, result in results.items():
            assert isinstance(result, lmserve.GenerationResult), result
            assert result.token_ids == alone[prompt].token_ids
        assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2
