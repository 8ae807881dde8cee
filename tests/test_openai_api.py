"""OpenAI's request bodies as lmserve's GenerateRequest messages (no server: the daemon's
tests, test_openai_http.py, check the same over HTTP against gRPC)."""

from __future__ import annotations

import json

import pytest

from lmserve_server import openai_api
from lmserve_server.errors import InvalidArgumentError
from lmserve_server.openai_api import ChatCompletionRequest, CompletionRequest


def completion(**body: object) -> list:  # type: ignore[type-arg]
    request = openai_api.parse(CompletionRequest, json.dumps({"prompt": "Hi", **body}).encode())
    return openai_api.completion_messages(request)


def chat(**body: object):  # type: ignore[no-untyped-def]
    messages = body.pop("messages", [{"role": "user", "content": "Hi"}])
    raw = json.dumps({"messages": messages, **body}).encode()
    return openai_api.chat_message(openai_api.parse(ChatCompletionRequest, raw))


def refusal(call, **body: object) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError) as err:
        call(**body)
    return str(err.value)


def test_openai_names_map_onto_the_grpc_fields() -> None:
    (message,) = completion(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop="\n",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"50256": -100},
        user="alice",
        top_k=40,
        min_p=0.1,
        repetition_penalty=1.1,
        min_tokens=2,
        stop_token_ids=[13],
        logprobs=2,
    )
    assert message.max_new_tokens == 7 and message.min_new_tokens == 2
    assert message.temperature == pytest.approx(0.5) and message.top_p == pytest.approx(0.9)
    assert (message.seed, message.top_k, message.logprobs) == (3, 40, 2)
    assert list(message.stop) == ["\n"] and list(message.stop_token_ids) == [13]
    assert dict(message.logit_bias) == {50256: -100.0}
    assert message.cache_salt == "alice"
    assert completion(user="alice", cache_salt="tenant-1")[0].cache_salt == "tenant-1"


def test_openai_defaults_hold_where_they_differ_from_grpcs() -> None:
    (message,) = completion()
    assert message.temperature == 1.0  # OpenAI samples unless told otherwise
    assert not message.HasField("seed") and message.max_new_tokens == 0  # server default
    assert not message.HasField("structured_output")
    assert completion(top_k=-1)[0].HasField("top_k") is False  # vLLM's "no limit"


def test_chat_fields() -> None:
    message = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            },
            {"role": "assistant", "content": None},
        ],
        max_tokens=9,
        max_completion_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    assert [(m.role, m.content) for m in message.messages] == [
        ("system", "Be brief."),
        ("user", "AB"),
        ("assistant", ""),
    ]
    assert message.max_new_tokens == 5  # max_completion_tokens wins
    assert message.logprobs == 3
    assert chat(logprobs=True).logprobs == 0 and chat(logprobs=True).HasField("logprobs")
    assert not chat().HasField("logprobs")


def test_formats_map_and_only_one_may_be_given() -> None:
    schema = {"type": "object"}
    formats = {
        "json_object": completion(response_format={"type": "json_object"}),
        "json_schema": completion(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        ),
        "regex": completion(guided_regex="[0-9]+"),
        "choice": completion(guided_choice=["a", "b"]),
        "grammar": completion(guided_grammar='start: "x"'),
        "json_schema ": completion(structured_outputs={"json": schema}),
    }
    for kind, (message,) in formats.items():
        assert message.structured_output.WhichOneof("format") == kind.strip()
    assert json.loads(formats["json_schema"][0].structured_output.json_schema) == schema
    assert completion(response_format={"type": "text"})[0].HasField("structured_output") is False
    assert refusal(
        completion, response_format={"type": "json_object"}, guided_regex="x"
    ).startswith("response_format, guided_regex: set at most one output format")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"max_tokens": 0}, "max_tokens: 0 must be at least 1"),
        ({"seed": -1}, "seed: -1 must be a whole number >= 0"),
        ({"logit_bias": {"x": 1}}, "logit_bias: 'x' is not a token id"),
        ({"echo": True}, "echo: not supported"),
        ({"best_of": 3}, "best_of: not supported"),
        ({"max_tokens": "5"}, "max_tokens: input should be a valid integer"),
        ({"prompt": 5}, "prompt: not a value of a type it takes"),
        ({"prompt": []}, "prompt: must not be empty"),
        ({"ignore_eos": True}, "ignore_eos: needs max_tokens"),
        ({"stream": 1}, "stream: input should be a valid boolean"),
    ],
)
def test_what_has_no_lmserve_meaning_or_type_is_refused(body: dict, says: str) -> None:  # type: ignore[type-arg]
    assert refusal(completion, **body).startswith(says)


def test_chat_refusals() -> None:
    assert refusal(chat, top_logprobs=2).startswith("top_logprobs: only with logprobs: true")
    assert refusal(chat, tools=[{"type": "function"}]).startswith("tools: not supported")
    assert refusal(chat, messages=[]).startswith("messages: must not be empty")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert refusal(chat, messages=image).startswith("messages[0].content: a part of type")


def test_malformed_bodies() -> None:
    for raw, says in ((b'{"prompt": "x",', "malformed JSON"), (b"[1]", "request body:")):
        with pytest.raises(InvalidArgumentError) as err:
            openai_api.parse(CompletionRequest, raw)
        assert str(err.value).startswith(says)


def test_n_is_bounded_by_the_batch() -> None:
    request = openai_api.parse(CompletionRequest, b'{"prompt": ["a", "b"], "n": 3}')
    openai_api.check_choices(request, 2, max_choices=6)
    with pytest.raises(InvalidArgumentError) as err:
        openai_api.check_choices(request, 2, max_choices=5)
    assert str(err.value).startswith("n: 2 prompts x 3, at most 5 per request (--max-batch-size")


@pytest.mark.parametrize(
    ("message", "chat_api", "param"),
    [
        ("max_new_tokens: 5000 exceeds the server's cap", False, "max_tokens"),
        ("max_new_tokens: 5000 exceeds the server's cap", True, "max_completion_tokens"),
        ("logprobs: 30 must be in [0, 20]", True, "top_logprobs"),
        ("logprobs: 30 must be in [0, 20]", False, "logprobs"),
        ("structured_output.regex: does not compile", False, "response_format"),
        ("min_new_tokens: 9 exceeds max_new_tokens (4)", False, "min_tokens"),
        ("messages[1].role: must not be empty", True, "messages"),
        ("prompt (9 tokens) + max_new_tokens (5) = 14 exceeds", False, None),
    ],
)
def test_an_error_names_the_openai_field(message: str, chat_api: bool, param: str | None) -> None:
    assert openai_api.param_of(message, chat_api) == param
