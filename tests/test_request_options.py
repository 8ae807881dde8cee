"""The request options a backend service expects, over real gRPC, under both schedulers:
token-id prompts, stop tokens, min_new_tokens, penalties, logit bias, logprobs, and usage on
a stream's last message; each option works inside a shared batch without changing what the
request would get alone."""

from __future__ import annotations

import collections
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from lmserve import Client, FinishReason
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.config import EngineConfig, ServerConfig
from tests.conftest import RunningDaemon

EOS = 50256
REPETITIVE = "the cat the cat the cat the cat the cat the cat"


@pytest.fixture(scope="module", params=["static", "continuous"])
def daemon_config(request: pytest.FixtureRequest, tiny_model_dir: Path) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(model=str(tiny_model_dir)),
        port=0,
        max_wait_ms=50,
        scheduler=request.param,
    )


@pytest.fixture
def client(daemon: RunningDaemon) -> Client:
    with Client(daemon.address, timeout=60) as c:
        yield c


def test_a_token_id_prompt_gives_the_tokens_of_the_same_text(client: Client) -> None:
    ids = client.tokenize("The future of AI is")
    by_text = client.generate("The future of AI is", max_new_tokens=12)
    by_ids = client.generate(ids, max_new_tokens=12)
    assert by_ids.token_ids == by_text.token_ids and by_ids.text == by_text.text
    assert by_ids.prompt_tokens == len(ids)


def test_a_stop_token_ends_with_stop_and_is_not_returned(client: Client) -> None:
    full = client.generate("Once upon a time", max_new_tokens=12)
    stop = full.token_ids[5]
    cut = full.token_ids.index(stop)  # its first occurrence ends the row
    result = client.generate("Once upon a time", max_new_tokens=12, stop_token_ids=[stop])
    assert result.finish_reason is FinishReason.STOP
    assert result.token_ids == full.token_ids[:cut]
    assert stop not in result.token_ids


def test_logit_bias_forces_eos_and_min_new_tokens_holds_it_back(client: Client) -> None:
    forced = client.generate("Hello", max_new_tokens=10, logit_bias={EOS: 100})
    assert (forced.finish_reason, forced.completion_tokens) == (FinishReason.EOS, 0)
    held = client.generate("Hello", max_new_tokens=10, logit_bias={EOS: 100}, min_new_tokens=4)
    assert (held.finish_reason, held.completion_tokens) == (FinishReason.EOS, 4)
    # A stop token is held back the same way.
    plain = client.generate("Hello", max_new_tokens=10)
    held_stop = client.generate(
        "Hello",
        max_new_tokens=10,
        stop_token_ids=[plain.token_ids[0]],
        logit_bias={plain.token_ids[0]: 100},
        min_new_tokens=3,
    )
    assert held_stop.finish_reason is FinishReason.STOP and held_stop.completion_tokens == 3


@pytest.mark.parametrize(
    "penalty",
    [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.5}],
)
def test_penalties_reduce_repeats(client: Client, penalty: dict[str, float]) -> None:
    plain = client.generate(REPETITIVE, max_new_tokens=40)
    penalised = client.generate(REPETITIVE, max_new_tokens=40, **penalty)  # type: ignore[arg-type]
    repeats = collections.Counter(plain.token_ids).most_common(1)[0][1]
    penalised_repeats = collections.Counter(penalised.token_ids).most_common(1)[0][1]
    assert repeats > 2, "the premise: this model repeats itself on this prompt"
    assert penalised_repeats < repeats
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def check_logprobs(result: Any, n: int, greedy: bool) -> None:
    assert len(result.logprobs) == len(result.token_ids) > 0
    for token, lp in zip(result.token_ids, result.logprobs, strict=True):
        assert lp.token_id == token
        assert lp.logprob <= 0.0
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True), "most likely first"
        assert all(v <= 0.0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-4
        if greedy:
            assert lp.top[0][0] == token and math.isclose(lp.top[0][1], lp.logprob)
        else:
            assert lp.logprob <= lp.top[0][1] + 1e-6


def test_logprobs_of_greedy_and_sampled_tokens(client: Client) -> None:
    greedy = client.generate("The future of AI is", max_new_tokens=8, logprobs=5)
    check_logprobs(greedy, 5, greedy=True)
    plain = client.generate("The future of AI is", max_new_tokens=8)
    assert greedy.token_ids == plain.token_ids and plain.logprobs == ()
    sampled = client.generate(
        "The future of AI is", max_new_tokens=8, logprobs=3, temperature=1.0, top_k=20, seed=3
    )
    check_logprobs(sampled, 3, greedy=False)
    chosen_only = client.generate("Hello", max_new_tokens=4, logprobs=0)
    assert all(lp.top == () and lp.logprob <= 0 for lp in chosen_only.logprobs)


def test_min_p_keeps_the_tokens_close_to_the_likeliest(client: Client) -> None:
    """min_p 1 keeps only the likeliest token: a sample at any temperature is the greedy
    continuation; a small min_p still samples."""
    greedy = client.generate("Once upon a time", max_new_tokens=10)
    only_the_top = client.generate(
        "Once upon a time", max_new_tokens=10, temperature=1.5, min_p=1.0, seed=4
    )
    assert only_the_top.token_ids == greedy.token_ids
    loose = client.generate(
        "Once upon a time", max_new_tokens=10, temperature=1.5, min_p=0.01, seed=4, logprobs=2
    )
    assert loose.token_ids != greedy.token_ids
    check_logprobs(loose, 2, greedy=False)


def test_streamed_logprobs_and_usage_match_the_unary_result(client: Client) -> None:
    options: dict[str, Any] = {"max_new_tokens": 16, "logprobs": 2, "temperature": 0.9, "seed": 8}
    unary = client.generate("Once upon a time", **options)
    chunks = list(client.stream("Once upon a time", **options))
    assert tuple(lp for c in chunks for lp in c.logprobs) == unary.logprobs
    assert tuple(t for c in chunks for t in c.token_ids) == unary.token_ids
    last = chunks[-1]
    assert last.finish_reason is unary.finish_reason
    assert (last.prompt_tokens, last.completion_tokens) == (
        unary.prompt_tokens,
        unary.completion_tokens,
    )
    assert last.batch_size >= 1 and last.compute_ms > 0 and last.queue_ms >= 0
    assert all(c.batch_size == 0 for c in chunks[:-1]), "usage rides on the last message"


MIXED: list[tuple[str | list[int], dict[str, Any]]] = [
    ("The future of AI is", {"max_new_tokens": 12, "logprobs": 3}),
    (REPETITIVE, {"max_new_tokens": 20, "repetition_penalty": 1.4}),
    ("Hello", {"max_new_tokens": 10, "logit_bias": {EOS: 100}, "min_new_tokens": 6}),
    (
        "Once upon a time",
        {
            "max_new_tokens": 15,
            "frequency_penalty": 1.0,
            "temperature": 0.8,
            "seed": 4,
            "logprobs": 1,
        },
    ),
    ([464, 2003, 286], {"max_new_tokens": 9, "presence_penalty": -1.0}),
    (
        "gRPC servers",
        {
            "max_new_tokens": 14,
            "top_p": 0.8,
            "temperature": 1.1,
            "seed": 9,
            "logit_bias": {11: 5.0, 13: -5.0},
        },
    ),
    ("x", {"max_new_tokens": 8}),
]


def test_a_batch_mixing_every_option_gives_each_request_its_solo_tokens(
    client: Client, daemon: RunningDaemon
) -> None:
    alone = [client.generate(prompt, **options) for prompt, options in MIXED]
    with ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(lambda po: client.generate(po[0], **po[1]), MIXED))
    for a, t in zip(alone, together, strict=True):
        assert (t.token_ids, t.finish_reason) == (a.token_ids, a.finish_reason)
        assert [lp.token_id for lp in t.logprobs] == [lp.token_id for lp in a.logprobs]
        for x, y in zip(t.logprobs, a.logprobs, strict=True):
            assert math.isclose(x.logprob, y.logprob, abs_tol=1e-4)
    assert max(r.batch_size for r in together) > 1, "they shared a batch"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompt": "", "prompt_token_ids": [99999]}, "prompt_token_ids"),
        ({"prompt_token_ids": [5]}, "prompt_token_ids"),  # as well as the text prompt
        ({"stop_token_ids": [50257]}, "stop_token_ids"),
        ({"min_new_tokens": 9}, "min_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logit_bias": {50257: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        # Past 32 bits: read whole (uint64 on the wire) and refused, never wrapped to a
        # small valid value.
        ({"prompt": "", "prompt_token_ids": [2**32 + 5]}, "prompt_token_ids"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"min_new_tokens": 2**32 + 2}, "min_new_tokens"),
        ({"logit_bias": {2**32 + 5: 1.0}}, "logit_bias"),
        ({"logprobs": 2**32 + 1}, "logprobs"),
        ({"top_k": 2**32 + 5}, "top_k"),
    ],
)
def test_bad_options_are_invalid_argument_naming_the_field(
    daemon: RunningDaemon, fields: dict[str, Any], named: str
) -> None:
    request = lmserve_pb2.GenerateRequest(prompt="Hello", max_new_tokens=8)
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(request, name).update(value)
        elif isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    with grpc.insecure_channel(daemon.address) as channel, pytest.raises(grpc.RpcError) as err:
        lmserve_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()
