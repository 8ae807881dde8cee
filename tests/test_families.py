"""Every decoder family end to end, under both schedulers (static with either engine): a real
daemon on loopback serving a tiny random checkpoint of the family (GPT-2 with wide and with
flat logits, Llama with grouped-query attention, Qwen2 with biases and a sliding-window
layer, GPT-NeoX, OPT). A request's tokens never depend on its batch company, and a stream is
the unary result."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmserve import Client, FinishReason
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from tests.conftest import RunningDaemon
from tests.test_engine import PROMPTS


@pytest.fixture(scope="module", params=["static", "continuous", "static-steps"])
def family_daemon(
    request: pytest.FixtureRequest, family_engine: Engine, tiny_model_dir: Path
) -> Iterator[RunningDaemon]:
    scheduler, _, engine = request.param.partition("-")
    config = ServerConfig(
        engine=EngineConfig(model=family_engine.name),
        port=0,
        max_wait_ms=50,
        scheduler=scheduler,
        static_engine=engine or "auto",  # static-steps: batches through the runner's steps
        max_step_tokens=48,  # prompts go in chunks beside running rows
    )
    running = RunningDaemon(config, family_engine)
    yield running
    running.stop()


def test_greedy_tokens_do_not_depend_on_the_batch(family_daemon: RunningDaemon) -> None:
    limits = [12, 5, 16, 9, 14, 7, 11, 3]
    with Client(family_daemon.address, timeout=120) as client:
        alone = [
            client.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, limits, strict=False)
        ]
        with ThreadPoolExecutor(len(limits)) as pool:
            together = list(
                pool.map(
                    lambda pn: client.generate(pn[0], max_new_tokens=pn[1]),
                    zip(PROMPTS, limits, strict=False),
                )
            )
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert max(r.batch_size for r in together) > 1, "they ran in company"


def test_seeded_samples_do_not_depend_on_the_batch(family_daemon: RunningDaemon) -> None:
    settings = [
        {"temperature": 1.0, "seed": 5},
        {"temperature": 0.8, "top_k": 20, "seed": 6},
        {"temperature": 1.2, "top_p": 0.8, "seed": 7},
        {},
    ]
    with Client(family_daemon.address, timeout=120) as client:
        alone = [client.generate("Hello there", max_new_tokens=10, **s) for s in settings]
        with ThreadPoolExecutor(len(settings)) as pool:
            together = list(
                pool.map(lambda s: client.generate("Hello there", max_new_tokens=10, **s), settings)
            )
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_a_stream_is_the_unary_result(family_daemon: RunningDaemon) -> None:
    with Client(family_daemon.address, timeout=120) as client:
        with ThreadPoolExecutor(4) as pool:
            streams = list(
                pool.map(lambda p: list(client.stream(p, max_new_tokens=20)), PROMPTS[:4])
            )
        for prompt, chunks in zip(PROMPTS[:4], streams, strict=True):
            unary = client.generate(prompt, max_new_tokens=20)
            assert "".join(c.text for c in chunks) == unary.text
            assert tuple(t for c in chunks for t in c.token_ids) == unary.token_ids
            assert chunks[-1].finish_reason is unary.finish_reason
            assert unary.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
