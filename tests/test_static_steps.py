"""The static scheduler's ``steps`` engine (a GPU's default): a batch the micro-batcher formed,
run to its end through the continuous runner's steps, gives every row what ``generate``
gives it, and a row that continues after a failed batch picks up where it stopped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmserve import Client
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.types import GenerationOutput, SamplingParams
from lmserve_server.scheduling.steps import StepSettings, planner, prepare_runner, run_to_end
from tests.conftest import RunningDaemon
from tests.test_engine import PROMPTS, generate, request

KINDS = [
    {},
    {"sampling": SamplingParams(temperature=0.9, top_p=0.9, seed=4), "logprobs": 2},
    {"sampling": SamplingParams(temperature=1.1, top_k=30, seed=8)},
    {"sampling": SamplingParams(repetition_penalty=1.4, presence_penalty=0.5)},
    {"min_new_tokens": 5, "stop": ("the",)},
]


def same(a: GenerationOutput | Exception, b: GenerationOutput | Exception) -> bool:
    """The same tokens, text and ending; logprobs to the last bits of float32 (the two engines'
    attention kernels differ there)."""
    assert isinstance(a, GenerationOutput) and isinstance(b, GenerationOutput)
    return (
        (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        and len(a.logprobs) == len(b.logprobs)
        and all(
            p.token_id == q.token_id
            and math.isclose(p.logprob, q.logprob, abs_tol=1e-4)
            and [t for t, _ in p.top] == [t for t, _ in q.top]
            for p, q in zip(a.logprobs, b.logprobs, strict=True)
        )
    )


def settings(rows: int = 8) -> StepSettings:
    return StepSettings(rows=rows, kv_tokens=rows * 256, max_step_tokens=40)


def test_a_batch_through_the_steps_is_generate_s_batch(engine: Engine) -> None:
    requests = [request(engine, p, 10, **k) for p, k in zip(PROMPTS, KINDS * 2, strict=False)]
    runner = prepare_runner(engine, settings())
    by_steps = run_to_end(runner, planner(settings()), [engine.new_row(r) for r in requests])
    assert all(map(same, by_steps, generate(engine, requests)))
    assert runner.cache.free_slots == 8, "every slot is free for the next batch"
    assert runner.cache.pool.held == 0, "and every block"


@pytest.mark.parametrize("kind", KINDS[:4])
def test_a_row_continues_after_the_tokens_it_had(engine: Engine, kind: dict[str, object]) -> None:
    """What a retried half of a failed batch does: the row comes back with its first tokens
    and gets the rest as if it had never stopped."""
    whole = generate(engine, [request(engine, "Once upon a time", 12, **kind)])[0]
    row = engine.new_row(request(engine, "Once upon a time", 12, **kind))
    for token, logprob in zip(
        whole.token_ids[:5], [*whole.logprobs[:5], *[None] * 5], strict=False
    ):
        row.take(token, logprob)
    runner = prepare_runner(engine, settings(2))
    [resumed] = run_to_end(runner, planner(settings(2)), [row])
    assert same(resumed, whole)


@pytest.fixture(scope="module")
def daemon_config(tiny_model_dir: Path) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(model=str(tiny_model_dir)),
        port=0,
        max_wait_ms=50,
        scheduler="static",
        static_engine="steps",
        kv_cache_tokens=8 * 512,
        max_batch_size=8,
    )


def test_the_daemon_reports_the_steps_engine_s_capacity(daemon: RunningDaemon) -> None:
    with Client(daemon.address, timeout=60) as client:
        info = client.model_info()
        assert info.scheduler == "static"
        # A request may hold up to the model's context of the shared pool.
        assert info.kv_cache_tokens == 8 * 512 and info.max_request_tokens == 1024
        result = client.generate("Hello", max_new_tokens=6)
    assert result.completion_tokens == 6


def test_a_request_over_the_limit_is_told_the_setting_behind_it() -> None:
    """The static scheduler's per-request limit is its batch token limit or, through the
    runner's steps, a KV cache slot, whichever is smaller; the refusal names that one."""
    from lmserve_server.scheduling.base import Capacity

    def flag(scheduler: str, limit: int, slot: int, batch_tokens: int) -> str:
        return Capacity(scheduler, limit, slot, 0, batch_tokens).request_tokens.flag

    assert flag("static", 512, 0, 512) == "--max-batch-tokens"  # generate, a batch limit
    assert flag("static", 256, 256 * 4, 512) == "--kv-cache-tokens"  # steps, a smaller slot
    assert flag("static", 512, 1024 * 4, 512) == "--max-batch-tokens"  # steps, a larger slot
    assert flag("continuous", 1024, 1024 * 4, 0) == "--kv-cache-tokens"
