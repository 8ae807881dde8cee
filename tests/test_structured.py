"""structured_output and messages over real gRPC, against real daemons on loopback.

Chat: ``messages`` are served exactly as the text its chat template renders, under both
schedulers. Structured output: what is refused is INVALID_ARGUMENT naming the field (the
compile's errors and its time limit included), the daemon stays up, compiles and cache hits
are counted in /metrics, and a valid grammar is compiled and the request served (what the
masks make of the rows: ``test_structured_rows.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import lmserve
from lmserve import (
    ChatMessage,
    Choice,
    Client,
    FinishReason,
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
)
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.testmodel import GPT2_EOS
from tests.conftest import RunningDaemon
from tests.ops_support import free_port, scrape

# A template with the model's BOS token, roles in markers and the generation prompt: the
# text it renders is written out by hand below, so the test does not render it the way the
# server does.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [ChatMessage("system", "Answer briefly."), ChatMessage("user", "Where is Oslo?")]
RENDERED = "<|endoftext|><|system|>Answer briefly.\n<|user|>Where is Oslo?\n<|assistant|>"
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}"
    "{{ raise_exception('the first message must come from the user') }}{% endif %}"
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)


def template_file(tmp_path: Path, text: str = TEMPLATE) -> str:
    path = tmp_path / "chat.jinja"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_messages_give_the_tokens_of_the_rendered_prompt(
    make_daemon, tmp_path: Path, scheduler: str
) -> None:  # type: ignore[no-untyped-def]
    running: RunningDaemon = make_daemon(scheduler=scheduler, chat_template=template_file(tmp_path))
    with Client(running.address, timeout=60) as client:
        prompt_ids = client.tokenize(RENDERED)
        assert prompt_ids[0] == GPT2_EOS  # the BOS text is the special token, as in a prompt
        chat = client.generate(CONVERSATION, max_new_tokens=12)
        plain = client.generate(RENDERED, max_new_tokens=12)
        as_dicts = client.generate([{"role": m.role, "content": m.content} for m in CONVERSATION])
        streamed = list(client.stream(CONVERSATION, max_new_tokens=12))
    assert chat.prompt_tokens == plain.prompt_tokens == len(prompt_ids)
    assert chat.token_ids == plain.token_ids and chat.text == plain.text
    assert len(chat.token_ids) == 12
    assert as_dicts.prompt_tokens == len(prompt_ids)
    assert "".join(c.text for c in streamed) == chat.text
    assert streamed[-1].prompt_tokens == len(prompt_ids)


def test_a_model_without_a_chat_template_refuses_messages(daemon: RunningDaemon) -> None:
    with (
        Client(daemon.address, timeout=60) as client,
        pytest.raises(lmserve.InvalidArgumentError) as err,
    ):
        client.generate(CONVERSATION)
    assert "messages: the served model has no chat template" in str(err.value)
    assert "--chat-template" in str(err.value)


def test_a_template_that_refuses_the_messages_is_invalid_argument(
    make_daemon, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon(chat_template=template_file(tmp_path, STRICT_TEMPLATE))
    with Client(running.address, timeout=60) as client:
        with pytest.raises(lmserve.InvalidArgumentError) as err:
            client.generate(CONVERSATION)
        assert str(err.value).endswith(
            "messages: the chat template refused them: the first message must come from the user"
        )
        assert client.generate([ChatMessage("user", "Hi")], max_new_tokens=2).completion_tokens


def call(address: str, request: lmserve_pb2.GenerateRequest) -> grpc.RpcError:
    """The error of a raw Generate call (for requests the typed client can't build)."""
    with grpc.insecure_channel(address) as channel:
        stub = lmserve_pb2_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


MESSAGE = lmserve_pb2.ChatMessage(role="user", content="Hi")


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (
            lmserve_pb2.GenerateRequest(prompt="Hi", messages=[MESSAGE]),
            "prompt, messages: set exactly one of prompt, prompt_token_ids and messages",
        ),
        (
            lmserve_pb2.GenerateRequest(prompt_token_ids=[1, 2], messages=[MESSAGE]),
            "prompt_token_ids, messages: set exactly one",
        ),
        (
            lmserve_pb2.GenerateRequest(),
            "prompt: must not be empty (or give prompt_token_ids or messages)",
        ),
        (
            lmserve_pb2.GenerateRequest(messages=[lmserve_pb2.ChatMessage(content="x")]),
            "messages[0].role: must not be empty",
        ),
        (
            lmserve_pb2.GenerateRequest(
                prompt="Hi", structured_output=lmserve_pb2.StructuredOutput()
            ),
            "structured_output: set one of json_schema, json_object, regex, choice, grammar",
        ),
        (
            lmserve_pb2.GenerateRequest(
                prompt="Hi", structured_output=lmserve_pb2.StructuredOutput(json_object=False)
            ),
            "structured_output.json_object: false asks for nothing",
        ),
        (
            lmserve_pb2.GenerateRequest(
                prompt="Hi",
                structured_output=lmserve_pb2.StructuredOutput(choice=lmserve_pb2.Choice()),
            ),
            "structured_output.choice.options: must not be empty",
        ),
        (
            lmserve_pb2.GenerateRequest(
                prompt="Hi",
                structured_output=lmserve_pb2.StructuredOutput(
                    choice=lmserve_pb2.Choice(options=["a", ""])
                ),
            ),
            "structured_output.choice.options: an option must not be empty",
        ),
        (
            lmserve_pb2.GenerateRequest(
                prompt="Hi", structured_output=lmserve_pb2.StructuredOutput(regex=" ")
            ),
            "structured_output.regex: must not be empty",
        ),
        (
            lmserve_pb2.GenerateRequest(
                prompt="Hi",
                structured_output=lmserve_pb2.StructuredOutput(json_schema="x" * 100_001),
            ),
            "structured_output.json_schema: 100001 characters, at most 100000 allowed",
        ),
    ],
)
def test_a_malformed_request_is_invalid_argument_naming_the_field(
    daemon: RunningDaemon, request_: lmserve_pb2.GenerateRequest, says: str
) -> None:
    assert says in call(daemon.address, request_).details()


@pytest.mark.parametrize(
    ("output", "field", "says"),
    [
        (JsonSchema('{"type": "object"'), "structured_output.json_schema", "not JSON"),
        (JsonSchema({"type": "integr"}), "structured_output.json_schema", "integr"),
        (
            JsonSchema({"type": "array", "uniqueItems": True}),
            "structured_output.json_schema",
            "uniqueItems",
        ),
        (Regex("(unclosed"), "structured_output.regex", "unclosed"),
        (Grammar("start: ("), "structured_output.grammar", ""),
    ],
)
def test_a_grammar_that_does_not_compile_is_invalid_argument_naming_the_field(
    daemon: RunningDaemon, output: lmserve.StructuredOutput, field: str, says: str
) -> None:
    with Client(daemon.address, timeout=60) as client:
        with pytest.raises(lmserve.InvalidArgumentError) as err:
            client.generate("Hi", structured_output=output)
        assert str(err.value).startswith(f"INVALID_ARGUMENT: {field}: ")
        assert says in str(err.value)
        assert client.health() == "SERVING"


def test_a_compile_over_the_time_limit_is_invalid_argument(make_daemon) -> None:  # type: ignore[no-untyped-def]
    # ~95k characters, tens of milliseconds to compile: far over a 1 ms limit.
    schema = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string"} for i in range(1500)},
        "required": [f"field_{i}" for i in range(1500)],
    }
    running = make_daemon(grammar_compile_timeout_s=0.001)
    with Client(running.address, timeout=60) as client:
        with pytest.raises(lmserve.InvalidArgumentError) as err:
            client.generate("Hi", structured_output=JsonSchema(schema))
        assert "structured_output.json_schema: took longer than 0.001 s to compile" in str(
            err.value
        )
        assert client.generate("Hi", max_new_tokens=3).completion_tokens == 3


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_valid_grammars_are_compiled_counted_and_the_requests_served(
    make_daemon, scheduler: str
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    running = make_daemon(scheduler=scheduler, metrics_port=port)
    outputs = [
        JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}}),
        JsonObject(),
        Regex("[0-9]{3}"),
        Choice(["yes", "no"]),
        Grammar('start: "x"+'),
    ]
    with Client(running.address, timeout=60) as client:
        for output in outputs + outputs[:2]:  # the last two: from the cache
            result = client.generate("Hi", max_new_tokens=4, structured_output=output)
            assert 0 < result.completion_tokens <= 4
        # A format that ends early ends the row, finish reason STOP.
        three = client.generate("Hi", max_new_tokens=10, structured_output=Regex("[0-9]{3}"))
        assert re.fullmatch("[0-9]{3}", three.text) and three.finish_reason is FinishReason.STOP
        with pytest.raises(lmserve.InvalidArgumentError):
            client.generate("Hi", structured_output=Regex("(bad"))
    metrics = scrape(port)
    for kind, count in (("json_schema", 1), ("json_object", 1), ("regex", 2), ("choice", 1)):
        key = ("lmserve_grammar_compile_seconds_count", (("kind", kind),))
        assert metrics[key] == count, kind
    assert metrics[("lmserve_grammar_cache_hits_total", ())] == 3


def test_serve_flags_and_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmserve_server.cli import build_parser, config_from_args

    def parse(*args: str):  # type: ignore[no-untyped-def]
        return config_from_args(build_parser().parse_args(["serve", *args]))

    config = parse()
    assert (config.grammar_compile_timeout_s, config.grammar_cache_size) == (5.0, 256)
    assert config.chat_template is None
    monkeypatch.setenv("LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S", "0.5")
    monkeypatch.setenv("LMSERVE_GRAMMAR_CACHE_SIZE", "3")
    monkeypatch.setenv("LMSERVE_CHAT_TEMPLATE", "/etc/lmserve/chat.jinja")
    config = parse()
    assert (config.grammar_compile_timeout_s, config.grammar_cache_size) == (0.5, 3)
    assert config.chat_template == "/etc/lmserve/chat.jinja"
    assert parse("--grammar-cache-size", "9", "--chat-template", "").grammar_cache_size == 9
    assert parse("--chat-template", "").chat_template is None
    with pytest.raises(ValueError, match=r"--grammar-compile-timeout-s \(LMSERVE_GRAMMAR_COMP"):
        parse("--grammar-compile-timeout-s", "0")


def test_hardening_flags_and_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmserve_server.cli import build_parser, config_from_args

    def parse(*args: str):  # type: ignore[no-untyped-def]
        return config_from_args(build_parser().parse_args(["serve", *args]))

    config = parse()
    assert config.grammar_cache_memory == 512 * 2**20
    assert (config.grammar_mask_budget_ms, config.chat_special_tokens) == (20.0, "parse")
    monkeypatch.setenv("LMSERVE_GRAMMAR_CACHE_MEMORY", "2GiB")
    monkeypatch.setenv("LMSERVE_GRAMMAR_MASK_BUDGET_MS", "5")
    monkeypatch.setenv("LMSERVE_CHAT_SPECIAL_TOKENS", "literal")
    config = parse()
    assert config.grammar_cache_memory == 2 * 2**30
    assert (config.grammar_mask_budget_ms, config.chat_special_tokens) == (5.0, "literal")
    assert parse("--grammar-cache-memory", "300MB").grammar_cache_memory == 300_000_000
    assert parse("--grammar-cache-memory", "1048576").grammar_cache_memory == 2**20
    with pytest.raises(SystemExit):
        parse("--grammar-cache-memory", "lots")
    with pytest.raises(SystemExit):
        parse("--chat-special-tokens", "strip")
    with pytest.raises(ValueError, match=r"--grammar-cache-memory \(LMSERVE_GRAMMAR_CACHE_MEM"):
        parse("--grammar-cache-memory", "1KiB")
    with pytest.raises(ValueError, match=r"--grammar-mask-budget-ms"):
        parse("--grammar-mask-budget-ms", "0")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read it"),
        ("{% for m in messages %}", "not a Jinja template: line 1"),
    ],
)
def test_a_bad_chat_template_stops_the_start_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "chat.jinja"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "lmserve_server.cli", "serve", "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LMSERVE_CHAT_TEMPLATE": str(path), "LMSERVE_PORT": "0"},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"lmserve: error: --chat-template {path}: {says}")
    assert "Traceback" not in proc.stderr and "loaded" not in proc.stderr


def test_the_checkpoints_own_chat_template_is_used(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from lmserve_server.chat import ChatRenderer

    for name in os.listdir(tiny_model_dir):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert not ChatRenderer(AutoTokenizer.from_pretrained(tmp_path)).available
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tmp_path))
    pairs = [(m.role, m.content) for m in CONVERSATION]
    assert renderer.render(pairs) == RENDERED
    # --chat-template wins over the checkpoint's.
    override = ChatRenderer(AutoTokenizer.from_pretrained(tmp_path), "{{ messages[-1].content }}")
    assert override.render(pairs) == "Where is Oslo?"


def test_messages_count_against_the_prompt_limit(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon(max_prompt_chars=50)
    request = lmserve_pb2.GenerateRequest(
        messages=[lmserve_pb2.ChatMessage(role="user", content="x" * 60)]
    )
    assert "messages: 64 characters, at most 50 allowed" in call(running.address, request).details()
    choice = lmserve_pb2.StructuredOutput(choice=lmserve_pb2.Choice(options=["y" * 51]))
    request = lmserve_pb2.GenerateRequest(prompt="Hi", structured_output=choice)
    assert (
        "structured_output.choice.options: 51 characters"
        in call(running.address, request).details()
    )
