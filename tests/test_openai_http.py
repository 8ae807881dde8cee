"""The OpenAI-compatible HTTP API (--http-port), called with OpenAI's own Python SDK (and,
for what the SDK would not send, a plain HTTP client) against a real daemon on loopback:
the same tokens as the same request over gRPC, OpenAI's shapes, and its error statuses."""

from __future__ import annotations

import ast
import asyncio
import http.client
import json
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from lmserve import ChatMessage, Client, JsonObject
from lmserve_server.cli import build_parser, check_before_loading, config_from_args
from lmserve_server.config import ServerConfig
from tests.conftest import RunningDaemon, engine_for
from tests.ops_support import free_port, make_pki, run_group, scrape
from tests.test_readme import code_blocks, section

MODEL = "tiny-gpt2"
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where is Oslo?"},
]
BODY_LIMIT = 64 * 1024


def start(config: ServerConfig, request: pytest.FixtureRequest, **changes: Any) -> RunningDaemon:
    changes.setdefault("http_port", free_port())
    return RunningDaemon(replace(config, **changes), engine_for(config, request))


@pytest.fixture(scope="module")
def served(
    daemon_config: ServerConfig,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningDaemon]:
    template = tmp_path_factory.mktemp("chat") / "chat.jinja"
    template.write_text(TEMPLATE)
    running = start(
        daemon_config,
        request,
        served_model_name=MODEL,
        chat_template=str(template),
        max_message_bytes=BODY_LIMIT,
    )
    yield running
    running.stop()


def base_url(running: RunningDaemon) -> str:
    return f"http://127.0.0.1:{running.daemon.http_port}/v1"


@pytest.fixture
def sdk(served: RunningDaemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url(served), api_key="-", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def grpc_client(served: RunningDaemon) -> Iterator[Client]:
    with Client(served.address, timeout=60) as c:
        yield c


def post(running: RunningDaemon, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
    """A raw POST (what the SDK would never send), its status and JSON reply."""
    connection = http.client.HTTPConnection("127.0.0.1", running.daemon.http_port, timeout=60)
    try:
        connection.request("POST", path, body, {"content-type": "application/json", **headers})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def test_completions_give_the_tokens_of_the_same_grpc_request(
    sdk: openai.OpenAI, grpc_client: Client
) -> None:
    options = {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    unary = sdk.completions.create(model=MODEL, prompt="Once upon a time", logprobs=2, **options)
    over_grpc = grpc_client.generate(
        "Once upon a time", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, logprobs=2
    )
    (choice,) = unary.choices
    assert choice.text == over_grpc.text
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs == pytest.approx(
        [lp.logprob for lp in over_grpc.logprobs]
    )
    assert [len(top) for top in choice.logprobs.top_logprobs or []] == [2] * 12
    assert unary.usage is not None
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (
        over_grpc.prompt_tokens,
        12,
    )
    assert unary.model == MODEL

    chunks = list(
        sdk.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == over_grpc.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len([c for c in chunks if c.choices]) > 3, "text must come as it is generated"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_chat_gives_the_tokens_of_the_same_grpc_messages(
    served: RunningDaemon, grpc_client: Client
) -> None:
    over_grpc = grpc_client.generate(
        [ChatMessage(m["role"], m["content"]) for m in CONVERSATION],
        max_new_tokens=10,
        temperature=1.0,
        seed=3,
    )

    async def calls() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(
            base_url=base_url(served), api_key="-", max_retries=0, timeout=60
        ) as client:
            options: dict[str, Any] = {
                "model": MODEL,
                "messages": CONVERSATION,
                "max_completion_tokens": 10,
                "seed": 3,
            }
            unary = await client.chat.completions.create(**options)
            stream = await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **options
            )
            return unary, [chunk async for chunk in stream]

    unary, chunks = asyncio.run(calls())
    assert unary.choices[0].message.content == over_grpc.text
    assert unary.choices[0].message.role == "assistant"
    assert unary.usage.prompt_tokens == over_grpc.prompt_tokens
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == over_grpc.text
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_n_choices_sample_with_consecutive_seeds(sdk: openai.OpenAI, grpc_client: Client) -> None:
    reply = sdk.completions.create(
        model=MODEL, prompt="The river", max_tokens=8, n=3, seed=11, temperature=1.0
    )
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    for i, text in enumerate(texts):
        alone = grpc_client.generate("The river", max_new_tokens=8, temperature=1.0, seed=11 + i)
        assert text == alone.text
    assert len(set(texts)) == 3
    assert reply.usage is not None
    prompt_tokens = grpc_client.generate("The river", max_new_tokens=1).prompt_tokens
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == 24

    streamed: dict[int, str] = {}
    for chunk in sdk.completions.create(
        model=MODEL, prompt="The river", max_tokens=8, n=3, seed=11, temperature=1.0, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == texts


def test_response_format_and_guided_choice_constrain_the_output(
    sdk: openai.OpenAI, grpc_client: Client
) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
        "additionalProperties": False,
    }
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
    )
    content = reply.choices[0].message.content
    assert content is not None and reply.choices[0].finish_reason == "stop"
    assert set(json.loads(content)) == {"name"}
    # Any JSON object: a random model's rarely closes within a few tokens; its start is the
    # same as over gRPC.
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,
        max_tokens=6,
        temperature=0,
        response_format={"type": "json_object"},
    )
    over_grpc = grpc_client.generate(
        [ChatMessage(m["role"], m["content"]) for m in CONVERSATION],
        max_new_tokens=6,
        structured_output=JsonObject(),
    )
    assert reply.choices[0].message.content == over_grpc.text
    assert over_grpc.text.startswith("{")
    choice = sdk.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].text in ("yes", "no")


def test_chat_logprobs_give_each_token_and_its_alternatives(
    sdk: openai.OpenAI, grpc_client: Client
) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    over_grpc = grpc_client.generate(
        [ChatMessage(m["role"], m["content"]) for m in CONVERSATION],
        max_new_tokens=6,
        logprobs=3,
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [e.logprob for e in logprobs.content] == pytest.approx(
        [lp.logprob for lp in over_grpc.logprobs]
    )
    assert "".join(e.token for e in logprobs.content) == reply.choices[0].message.content
    for entry in logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert bytes(entry.bytes or []) == entry.token.encode()
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy: the top token


def test_models_and_health(sdk: openai.OpenAI, served: RunningDaemon) -> None:
    (model,) = sdk.models.list().data
    assert model.id == MODEL
    connection = http.client.HTTPConnection("127.0.0.1", served.daemon.http_port, timeout=10)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
    # No --metrics-port: /metrics is here, with what the HTTP requests so far recorded.
    list(sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream=True))
    metrics = scrape(served.daemon.http_port)
    assert metrics[("lmserve_prompt_tokens_total", ())] > 0
    assert metrics[("lmserve_time_to_first_token_seconds_count", ())] > 0


def openai_error(status: int, reply: Any) -> tuple[int, str, str | None]:
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error["message"], error["param"]


def test_bad_inputs_get_openai_errors_and_leave_a_running_request_alone(
    served: RunningDaemon, sdk: openai.OpenAI, grpc_client: Client
) -> None:
    prompt, options = "A long walk", {"max_tokens": 60, "temperature": 1.0, "seed": 5}
    alone = sdk.completions.create(model=MODEL, prompt=prompt, **options).choices[0].text

    def streamed() -> str:
        chunks = sdk.completions.create(model=MODEL, prompt=prompt, stream=True, **options)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(streamed)
        deadline = time.monotonic() + 30
        while not served.daemon.scheduler.busy:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.001)
        completions = "/v1/completions"
        status, message, _ = openai_error(*post(served, completions, b'{"prompt": "x",'))
        assert (status, message.split(":")[0]) == (400, "malformed JSON")
        status, message, param = openai_error(
            *post(served, completions, b'{"prompt": "x", "max_tokens": "5"}')
        )
        assert (status, param, message) == (
            400,
            "max_tokens",
            "max_tokens: input should be a valid integer",
        )
        status, message, param = openai_error(
            *post(served, completions, b'{"prompt": "x", "temperature": -1}')
        )
        assert (status, param) == (400, "temperature")
        assert message == "temperature: -1.0 must be >= 0 (0 means greedy)"  # gRPC's words
        status, _, param = openai_error(
            *post(served, completions, json.dumps({"prompt": "x", "n": 1000}).encode())
        )
        assert (status, param) == (400, "n")
        status, message, _ = openai_error(
            *post(served, completions, json.dumps({"prompt": "x" * BODY_LIMIT}).encode())
        )
        assert (status, message) == (
            413,
            f"request body: more than {BODY_LIMIT} bytes (--max-message-bytes)",
        )
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.completions.create(model="gpt-4", prompt="x", max_tokens=1)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as too_long:
            sdk.completions.create(model=MODEL, prompt="x", max_tokens=5000)
        assert too_long.value.param == "max_tokens"
        assert too_long.value.message.endswith("(--max-new-tokens-cap)")
        assert running.result(timeout=60) == alone


def test_a_full_queue_is_429(daemon_config: ServerConfig, request: pytest.FixtureRequest) -> None:
    running = start(daemon_config, request, max_queue=1)
    try:
        blocker = threading.Thread(
            target=lambda: Client(running.address).generate("blocker", max_new_tokens=150)
        )
        blocker.start()
        waiting = threading.Thread(
            target=lambda: Client(running.address).generate("waits", max_new_tokens=1)
        )
        deadline = time.monotonic() + 30
        while not running.daemon.scheduler.busy:
            assert time.monotonic() < deadline, "the blocking request never started"
            time.sleep(0.001)
        waiting.start()
        while running.daemon.scheduler.queue_depth < 1:
            assert time.monotonic() < deadline, "the waiting request never queued"
            time.sleep(0.001)
        with (
            openai.OpenAI(base_url=base_url(running), api_key="-", max_retries=0) as sdk,
            pytest.raises(openai.RateLimitError) as full,
        ):
            sdk.completions.create(model=None, prompt="x", max_tokens=1)  # type: ignore[arg-type]
        assert full.value.status_code == 429
        assert full.value.body["message"].startswith("queue is full")  # type: ignore[index]
        blocker.join(timeout=60)
        waiting.join(timeout=60)
    finally:
        running.stop()


@pytest.mark.parametrize("scheduler", ["continuous"])
def test_a_token_guards_the_api_and_a_leaving_client_frees_its_row(
    daemon_config: ServerConfig, request: pytest.FixtureRequest, scheduler: str
) -> None:
    running = start(daemon_config, request, scheduler=scheduler, auth_token="s3cret")
    try:
        url = base_url(running)
        with (
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as sdk,
            pytest.raises(openai.AuthenticationError) as refused,
        ):
            sdk.models.list()
        assert refused.value.body["message"] == "invalid bearer token"  # type: ignore[index]
        status, _ = post(running, "/v1/completions", b"{}")
        assert status == 401
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60) as sdk:
            reply = sdk.completions.create(
                model=None,  # type: ignore[arg-type]
                prompt="Hello there",
                max_tokens=10,
                temperature=0.7,
                seed=2,
            )
            with Client(running.address, token="s3cret", timeout=60) as client:
                over_grpc = client.generate(
                    "Hello there", max_new_tokens=10, temperature=0.7, seed=2
                )
            assert reply.choices[0].text == over_grpc.text

            stream = sdk.completions.create(
                model=None,  # type: ignore[arg-type]
                prompt="Hello",
                max_tokens=1000,
                stream=True,
            )
            next(iter(stream))
            assert running.daemon.scheduler.busy
            stream.close()
        deadline = time.monotonic() + 2  # 1000 tokens take several seconds here
        while running.daemon.scheduler.busy:
            assert time.monotonic() < deadline, "the abandoned stream kept the engine busy"
            time.sleep(0.005)
    finally:
        running.stop()


def test_the_http_port_is_a_flag_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = build_parser().parse_args(["serve", "--http-port", "8000"])
    assert config_from_args(args).http_port == 8000
    monkeypatch.setenv("LMSERVE_HTTP_PORT", "8001")
    monkeypatch.setenv("LMSERVE_SERVED_MODEL_NAME", "m")
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert (config.http_port, config.served_model_name) == (8001, "m")
    assert ServerConfig().http_port == 0  # off unless asked
    for other in ("port", "metrics_port"):
        with pytest.raises(
            ValueError, match=f"--http-port 8000 is also --{other.replace('_', '-')}"
        ):
            check_before_loading(ServerConfig(**{other: 8000}, http_port=8000))  # type: ignore[arg-type]


def test_a_client_that_leaves_a_unary_call_frees_its_row(served: RunningDaemon) -> None:
    with (
        openai.OpenAI(base_url=base_url(served), api_key="-", max_retries=0, timeout=0.5) as sdk,
        pytest.raises(openai.APITimeoutError),
    ):
        sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=1000, n=2)
    # 1000 tokens take several seconds here; the rows must end within a few steps.
    deadline = time.monotonic() + 2
    while served.daemon.scheduler.busy:
        assert time.monotonic() < deadline, "the abandoned request kept the engine busy"
        time.sleep(0.005)


def test_a_draining_daemon_finishes_what_it_accepted_and_refuses_the_rest(
    daemon_config: ServerConfig, request: pytest.FixtureRequest
) -> None:
    running = start(daemon_config, request)
    with (
        openai.OpenAI(base_url=base_url(running), api_key="-", max_retries=0, timeout=60) as sdk,
        ThreadPoolExecutor(2) as pool,
    ):
        options = {"model": None, "prompt": "Hello", "max_tokens": 120, "seed": 1}
        alone = sdk.completions.create(**options).choices[0].text  # type: ignore[call-overload]
        accepted = pool.submit(lambda: sdk.completions.create(**options).choices[0].text)  # type: ignore[call-overload]
        deadline = time.monotonic() + 30
        while not running.daemon.scheduler.busy:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.001)
        stopping = pool.submit(running.stop)
        health = http.client.HTTPConnection("127.0.0.1", running.daemon.http_port, timeout=10)
        while True:
            health.request("GET", "/health")
            reply = health.getresponse()
            reply.read()
            if reply.status == 503:
                break
            assert time.monotonic() < deadline, "health never said the daemon drains"
            time.sleep(0.005)
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.completions.create(**options)  # type: ignore[call-overload]
        assert refused.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.completions.create(stream=True, **options)  # type: ignore[call-overload]
        assert refused.value.status_code == 503  # before a stream's 200, not in it
        assert accepted.result(timeout=60) == alone
        stopping.result(timeout=60)


def test_the_readme_examples_run(served: RunningDaemon, tmp_path: Path) -> None:
    readme = section("The OpenAI-compatible HTTP API")
    (shell, *_) = code_blocks(readme)
    assert "--http-port 8000 --served-model-name tiny-gpt2" in shell
    (example,) = code_blocks(readme, "python")
    script = tmp_path / "example.py"
    script.write_text(example.replace(":8000/", f":{served.daemon.http_port}/"))
    done = run_group([sys.executable, str(script)], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first, streamed, chat = done.stdout.splitlines()
    assert first.endswith(" 8") and streamed
    assert len(ast.literal_eval(chat)) == 2


def test_the_port_speaks_mutual_tls_with_the_grpc_files(
    daemon_config: ServerConfig, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    running = start(
        daemon_config,
        request,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )
    port = running.daemon.http_port
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        trusted.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=trusted, timeout=60)
        body = json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        connection.request("POST", "/v1/completions", body)
        reply = connection.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read())["usage"]["completion_tokens"] == 3
        anonymous = ssl.create_default_context(cafile=str(pki.ca))  # no client certificate
        for refused in (
            http.client.HTTPSConnection("127.0.0.1", port, context=anonymous, timeout=10),
            http.client.HTTPConnection("127.0.0.1", port, timeout=10),  # plaintext
        ):
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                refused.request("GET", "/health")
                refused.getresponse().read()
    finally:
        running.stop()


def test_ignore_eos_generates_up_to_max_tokens(sdk: openai.OpenAI) -> None:
    eos_first = {"logit_bias": {"50256": 100}, "temperature": 0}
    ended = sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=5, **eos_first)
    assert (ended.choices[0].finish_reason, ended.usage and ended.usage.completion_tokens) == (
        "stop",
        0,
    )
    kept = sdk.completions.create(
        model=MODEL, prompt="Hi", max_tokens=5, extra_body={"ignore_eos": True}, **eos_first
    )
    assert kept.choices[0].finish_reason == "length"
    assert kept.usage is not None and kept.usage.completion_tokens == 5
