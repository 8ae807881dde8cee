"""What structured output guarantees, over real gRPC, under both schedulers (static with
either engine): at temperature 1 across many seeds on a random-weight model (the hardest
caller: it puts no weight on well-formed output), every row that ends by its grammar (finish
reason STOP) is a JSON document valid under its schema, a full match of its regex, or one of
its choices; a stream concatenates to the unary text; and the unconstrained requests batched
beside them get exactly the tokens they get alone."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from lmserve import Choice, Client, FinishReason, JsonObject, JsonSchema, Regex
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from tests.conftest import RunningDaemon, engine_for

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "kind", "age"],
    "additionalProperties": False,
}
PATTERN = "[a-z]{2,6}-[0-9]{1,3}"
OPTIONS = ["alpha", "beta gamma", "delta"]
SEEDS = range(16)


@pytest.fixture(scope="module", params=["static", "continuous", "static-steps"])
def daemon_config(request: pytest.FixtureRequest, tiny_model_dir: Path) -> ServerConfig:
    scheduler, _, engine = request.param.partition("-")
    return ServerConfig(
        engine=EngineConfig(model=str(tiny_model_dir)),
        port=0,
        max_wait_ms=30,
        scheduler=scheduler,
        static_engine=engine or "auto",
        max_batch_size=16,
        max_step_tokens=64,
    )


@pytest.fixture(scope="module")
def daemon(daemon_config: ServerConfig, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    running = RunningDaemon(daemon_config, engine_for(daemon_config, request))
    yield running
    running.stop()


@pytest.fixture
def client(daemon: RunningDaemon) -> Iterator[Client]:
    with Client(daemon.address, timeout=120) as c:
        yield c


def sampled(client: Client, output: object, seeds: range = SEEDS) -> list:  # type: ignore[type-arg]
    """One request per seed, all at once (they share batches), at temperature 1."""
    with ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(
                lambda seed: client.generate(
                    "Tell me about it:",
                    max_new_tokens=64,
                    temperature=1.0,
                    seed=seed,
                    structured_output=output,
                ),
                seeds,
            )
        )


def test_json_rows_ending_by_their_grammar_validate(client: Client) -> None:
    results = sampled(client, JsonSchema(SCHEMA))
    finished = [r for r in results if r.finish_reason is FinishReason.STOP]
    assert len(finished) >= len(results) // 2, [r.finish_reason for r in results]
    for r in finished:
        jsonschema.validate(json.loads(r.text), SCHEMA)
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', r.text)
        assert not re.search(r"\s", outside_strings), f"not compact: {r.text!r}"
    for r in results:  # the others stopped at max_new_tokens, a prefix of a document
        assert r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert r.text.startswith("{")


def test_any_json_object_parses(client: Client) -> None:
    results = sampled(client, JsonObject(), range(8))
    finished = [r for r in results if r.finish_reason is FinishReason.STOP]
    for r in finished:
        assert isinstance(json.loads(r.text), dict)
    assert all(r.text.startswith("{") for r in results)


def test_regex_rows_match_whole(client: Client) -> None:
    results = sampled(client, Regex(PATTERN))
    assert all(r.finish_reason is FinishReason.STOP for r in results)
    for r in results:
        assert re.fullmatch(PATTERN, r.text), r.text
    assert len({r.text for r in results}) > 3, "temperature 1 over the seeds: varied"


def test_choice_rows_are_one_of_the_options(client: Client) -> None:
    results = sampled(client, Choice(OPTIONS))
    assert all(r.finish_reason is FinishReason.STOP for r in results)
    assert {r.text for r in results} <= set(OPTIONS)
    assert len({r.text for r in results}) > 1


def test_a_constrained_stream_is_the_unary_result(client: Client) -> None:
    for output in (JsonSchema(SCHEMA), Regex(PATTERN)):
        options = {"max_new_tokens": 64, "temperature": 1.0, "seed": 3}
        unary = client.generate("Tell me:", structured_output=output, **options)
        chunks = list(client.stream("Tell me:", structured_output=output, **options))
        assert "".join(c.text for c in chunks) == unary.text
        assert tuple(t for c in chunks for t in c.token_ids) == unary.token_ids
        assert chunks[-1].finish_reason is unary.finish_reason


def test_unconstrained_neighbours_get_their_solo_tokens(client: Client) -> None:
    free = [
        {"max_new_tokens": 20},
        {"max_new_tokens": 20, "temperature": 1.0, "seed": 11},
        {"max_new_tokens": 20, "temperature": 0.7, "top_p": 0.9, "seed": 12, "logprobs": 2},
    ]
    alone = [client.generate("Once upon a time", **o) for o in free]
    constrained = [JsonSchema(SCHEMA), Regex(PATTERN), Choice(OPTIONS), JsonObject()] * 2
    with ThreadPoolExecutor(11) as pool:
        neighbours = [
            pool.submit(client.generate, "Tell me:", max_new_tokens=48, structured_output=c)
            for c in constrained
        ]
        together = list(pool.map(lambda o: client.generate("Once upon a time", **o), free))
        for f in neighbours:
            f.result()
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert max(r.batch_size for r in together) > 1, "they ran in company"


def test_constrained_rows_with_every_option(client: Client, engine: Engine) -> None:
    """Penalties, logit bias, logprobs, top-k/top-p and stop strings change what a row
    samples, never whether it follows its grammar."""
    eos = engine.eos_token_id
    results = []
    for seed in range(6):
        results.append(
            client.generate(
                "Tell me:",
                max_new_tokens=64,
                temperature=1.0,
                top_k=40,
                top_p=0.9,
                seed=seed,
                repetition_penalty=1.3,
                frequency_penalty=0.5,
                logit_bias={eos: 50.0},  # the end token where the grammar allows it
                logprobs=3,
                structured_output=JsonSchema(SCHEMA),
            )
        )
    for r in results:
        if r.finish_reason is FinishReason.STOP:
            jsonschema.validate(json.loads(r.text), SCHEMA)
        assert len(r.logprobs) == len(r.token_ids)
