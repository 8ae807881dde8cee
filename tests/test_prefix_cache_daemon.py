"""The prefix cache through a real daemon on loopback: ``cached_prompt_tokens`` on unary
responses and a stream's last message, ``cache_salt`` keeping tenants apart, the Prometheus
series, the flags, and a request's tokens and logprobs the same with ``--prefix-cache`` on
and off in every decoder family (unary and streamed, greedy and sampled)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import lmserve
from lmserve import Client, GenerationResult
from lmserve_server.cli import build_parser, config_from_args
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.prefix_cache import BLOCK
from tests.conftest import RunningDaemon
from tests.ops_support import free_port, scrape

# A system prompt of 100 token ids (three full blocks), then short questions.
_RNG = random.Random(11)
SYSTEM = [_RNG.randrange(50000) for _ in range(100)]


def question(i: int, length: int = 7) -> list[int]:
    rng = random.Random(i)
    return [*SYSTEM, *(rng.randrange(50000) for _ in range(length))]


def test_cached_prompt_tokens_on_unary_and_stream_and_off_with_the_flag(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon(scheduler="continuous")
    with Client(running.address, timeout=60) as client:
        first = client.generate(question(1), max_new_tokens=4)
        assert first.cached_prompt_tokens == 0, "nothing cached yet"
        second = client.generate(question(2), max_new_tokens=4)
        assert second.cached_prompt_tokens == 96, "the system prompt's three full blocks"
        chunks = list(client.stream(question(3), max_new_tokens=4))
        assert chunks[-1].finish_reason is not None
        assert chunks[-1].cached_prompt_tokens == 96
        assert all(c.cached_prompt_tokens == 0 for c in chunks[:-1])
        again = client.generate(question(1), max_new_tokens=4)
        assert again.cached_prompt_tokens == 96, "107 tokens: three full blocks"
        assert again.token_ids == first.token_ids
        whole = client.generate(question(8, 28), max_new_tokens=4)  # 128 tokens: 4 blocks
        assert whole.cached_prompt_tokens == 96
        again = client.generate(question(8, 28), max_new_tokens=4)  # wholly cached
        assert again.cached_prompt_tokens == 128 - 2, "all but its last two tokens"
        assert again.token_ids == whole.token_ids
    off = make_daemon(scheduler="continuous", prefix_cache=False)
    with Client(off.address, timeout=60) as client:
        for i in (1, 2, 1):
            assert client.generate(question(i), max_new_tokens=4).cached_prompt_tokens == 0
        assert list(client.stream(question(3), max_new_tokens=4))[-1].cached_prompt_tokens == 0
    assert off.daemon.scheduler.prefix_cache_stats.capacity_tokens == 0


def test_salts_keep_tenants_apart(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon(scheduler="continuous")
    with Client(running.address, timeout=60) as client:

        def cached(i: int, salt: str | None) -> int:
            return client.generate(
                question(i), max_new_tokens=2, cache_salt=salt
            ).cached_prompt_tokens

        assert cached(1, "tenant-a") == 0
        assert cached(2, "tenant-a") == 96
        assert cached(3, "tenant-b") == 0, "another tenant's prefix is not found"
        assert cached(4, None) == 0, "nor by the empty salt"
        assert cached(5, "") == 96, "the empty salt is a group of its own"
        assert cached(6, "tenant-b") == 96
        with pytest.raises(lmserve.InvalidArgumentError, match="cache_salt"):
            cached(7, "x" * 257)


def test_prefix_cache_metrics(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    running = make_daemon(scheduler="continuous", metrics_port=port, max_batch_size=4)
    results: list[GenerationResult] = []
    with Client(running.address, timeout=60) as client:
        results.append(client.generate(question(1), max_new_tokens=3))
        with ThreadPoolExecutor(3) as pool:
            results += pool.map(lambda i: client.generate(question(i), max_new_tokens=3), (2, 3, 4))
        results.append(list(client.stream(question(5, 40), max_new_tokens=3))[-1])  # type: ignore[arg-type]
    m = scrape(port)
    assert m[("lmserve_prefix_cache_queries_total", ())] == sum(r.prompt_tokens for r in results)
    hits = sum(r.cached_prompt_tokens for r in results)
    assert hits >= 96 and m[("lmserve_prefix_cache_hits_total", ())] == hits
    # By default the prefix cache may keep any of the KV cache's blocks.
    kv_tokens = m[("lmserve_kv_cache_blocks", ())] * BLOCK
    assert m[("lmserve_prefix_cache_capacity_tokens", ())] == kv_tokens > 0
    # The system prompt's 3 blocks, and the last question's fourth (100 + 40 tokens).
    assert m[("lmserve_prefix_cache_tokens", ())] == 4 * BLOCK
    assert m[("lmserve_prefix_cache_evicted_tokens_total", ())] == 0


def test_a_small_prefix_cache_evicts_and_says_so(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    running = make_daemon(scheduler="continuous", metrics_port=port, prefix_cache_tokens=128)
    rng = random.Random(3)
    prompts = [[rng.randrange(50000) for _ in range(70)] for _ in range(4)]
    with Client(running.address, timeout=60) as client:
        outputs = [client.generate(p, max_new_tokens=3) for p in prompts]  # 2 blocks each
        assert client.generate(prompts[-1], max_new_tokens=3).cached_prompt_tokens == 64
        assert client.generate(prompts[0], max_new_tokens=3).cached_prompt_tokens == 0
        assert [client.generate(p, max_new_tokens=3).token_ids for p in prompts] == [
            o.token_ids for o in outputs
        ]
    m = scrape(port)
    assert m[("lmserve_prefix_cache_capacity_tokens", ())] == 128
    assert m[("lmserve_prefix_cache_tokens", ())] <= 128
    assert m[("lmserve_prefix_cache_evicted_tokens_total", ())] >= 4 * 64 - 128


@pytest.mark.parametrize("engine_kind", ["steps", "generate"])
def test_static_batches_through_the_steps_share_prefixes_and_generate_does_not(
    make_daemon,  # type: ignore[no-untyped-def]
    engine_kind: str,
) -> None:
    running = make_daemon(scheduler="static", static_engine=engine_kind, max_wait_ms=5)
    with Client(running.address, timeout=60) as client:
        first = client.generate(question(1), max_new_tokens=3)
        with ThreadPoolExecutor(3) as pool:
            batch = list(
                pool.map(lambda i: client.generate(question(i), max_new_tokens=3), (2, 3, 4))
            )
    cached = [r.cached_prompt_tokens for r in (first, *batch)]
    if engine_kind == "steps":
        assert cached == [0, 96, 96, 96]
    else:
        assert cached == [0, 0, 0, 0]
        assert running.daemon.scheduler.prefix_cache_stats.capacity_tokens == 0


def test_flags_and_env_vars() -> None:
    def parse(*argv: str) -> ServerConfig:
        return config_from_args(build_parser().parse_args(["serve", *argv]))

    assert (parse().prefix_cache, parse().prefix_cache_tokens) == (True, 0)
    assert parse("--prefix-cache", "false").prefix_cache is False
    assert parse("--prefix-cache-tokens", "4096").prefix_cache_tokens == 4096
    with pytest.raises(
        ValueError, match=r"--prefix-cache-tokens \(LMSERVE_PREFIX_CACHE_TOKENS\) -1"
    ):
        parse("--prefix-cache-tokens", "-1")


def test_env_var_turns_the_cache_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_PREFIX_CACHE", "false")
    monkeypatch.setenv("LMSERVE_PREFIX_CACHE_TOKENS", "512")
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert (config.prefix_cache, config.prefix_cache_tokens) == (False, 512)


# ---- every family, with the cache and without -------------------------------------------------


@pytest.fixture(scope="module")
def on_and_off(family_engine: Engine, tiny_model_dir: Path) -> Iterator[tuple[str, str]]:
    config = ServerConfig(
        engine=EngineConfig(model=family_engine.name),
        port=0,
        scheduler="continuous",
        max_step_tokens=48,  # prompts in chunks beside running rows
    )
    on = RunningDaemon(config, family_engine)
    off = RunningDaemon(replace(config, prefix_cache=False), family_engine)
    yield on.address, off.address
    on.stop()
    off.stop()


SETTINGS: list[dict[str, Any]] = [
    {},
    {"temperature": 1.0, "seed": 3},
    {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 4},
    {"temperature": 1.2, "top_k": 30, "presence_penalty": 0.5, "seed": 5},
]


def test_one_at_a_time_the_same_bits_with_the_cache_and_without(
    on_and_off: tuple[str, str],
) -> None:
    """Requests one at a time (a row's company is then the same either way): tokens and
    logprobs are the same bits, unary and streamed."""
    on, off = on_and_off
    with Client(on, timeout=120) as cached, Client(off, timeout=120) as computed:
        for i in range(8):
            prompt, options = question(i, 3 + 9 * i), SETTINGS[i % 4]
            options = {**options, "max_new_tokens": 10, "logprobs": 2}
            a, b = cached.generate(prompt, **options), computed.generate(prompt, **options)
            assert (a.token_ids, a.logprobs, a.text) == (b.token_ids, b.logprobs, b.text)
            assert b.cached_prompt_tokens == 0 and (i == 0 or a.cached_prompt_tokens >= 96)
            chunks = list(cached.stream(prompt, **options))
            assert tuple(t for c in chunks for t in c.token_ids) == b.token_ids
            assert tuple(lp for c in chunks for lp in c.logprobs) == b.logprobs
            # Now its every full block is cached (all but the last two tokens at most).
            full = len(prompt) // BLOCK * BLOCK
            assert chunks[-1].cached_prompt_tokens == min(full, len(prompt) - 2)


def test_in_company_the_same_tokens_with_the_cache_and_without(
    on_and_off: tuple[str, str],
) -> None:
    """Twelve requests at once against the cache (admitted as the planner allows, after the
    others' prefixes) and one at a time without it: the same tokens. (A decoding row's
    attention is exact in its last bits only within the same company on a CPU, with or
    without the cache, so this compares tokens, as the batch-invariance tests do.)"""
    on, off = on_and_off
    jobs = [
        (question(100 + i, 2 + 5 * i), {**SETTINGS[i % 4], "max_new_tokens": 8}) for i in range(12)
    ]
    with Client(on, timeout=120) as cached, Client(off, timeout=120) as computed:
        alone = [computed.generate(p, **o).token_ids for p, o in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            unary = list(pool.map(lambda job: cached.generate(job[0], **job[1]), jobs))
            streams = list(pool.map(lambda job: list(cached.stream(job[0], **job[1])), jobs))
    assert [r.token_ids for r in unary] == alone
    assert [tuple(t for c in s for t in c.token_ids) for s in streams] == alone
    assert sum(r.cached_prompt_tokens > 0 for r in unary) >= 6
    assert all(s[-1].cached_prompt_tokens > 0 for s in streams)
