"""The client's structured output and chat arguments: typed values to protobuf, their JSON
form (bench lines), ``lmserve-client generate``'s flags and ``bench`` with JSONL lines that
carry them, the last two against a real daemon with a chat template."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from lmserve import ChatMessage, Choice, Grammar, JsonObject, JsonSchema, Regex, cli
from lmserve.bench_workload import load_prompts_file
from lmserve.structured import from_json
from lmserve.types import build_request
from tests.conftest import RunningDaemon

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"


def test_each_structured_output_becomes_its_oneof_field() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases: list[tuple[Any, str, Any]] = [
        (JsonSchema(schema), "json_schema", json.dumps(schema)),
        (JsonSchema('{"type": "string"}'), "json_schema", '{"type": "string"}'),
        (JsonObject(), "json_object", True),
        (Regex("[0-9]+"), "regex", "[0-9]+"),
        (Grammar('start: "a"'), "grammar", 'start: "a"'),
    ]
    for value, field, expected in cases:
        output = build_request("hi", structured_output=value).structured_output
        assert output.WhichOneof("format") == field
        assert getattr(output, field) == expected
    choice = build_request("hi", structured_output=Choice(["yes", "no"])).structured_output
    assert list(choice.choice.options) == ["yes", "no"]
    assert not build_request("hi").HasField("structured_output")
    with pytest.raises(TypeError, match="one string"):
        Choice("yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="structured_output: expected JsonSchema"):
        build_request("hi", structured_output={"regex": "x"})  # type: ignore[arg-type]


def test_a_prompt_may_be_a_conversation() -> None:
    request = build_request([ChatMessage("system", "Be brief."), {"role": "user", "content": "Hi"}])
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert not request.prompt and not request.prompt_token_ids
    assert list(build_request([1, 2]).prompt_token_ids) == [1, 2]
    with pytest.raises(ValueError, match="a chat message is"):
        build_request([{"role": "user", "text": "Hi"}])


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"json_schema": {"type": "integer"}}, JsonSchema('{"type": "integer"}')),
        ({"json_schema": '{"type": "integer"}'}, JsonSchema('{"type": "integer"}')),
        ({"json_object": True}, JsonObject()),
        ({"regex": "a+"}, Regex("a+")),
        ({"choice": ["a", "b"]}, Choice(["a", "b"])),
        ({"grammar": 'start: "a"'}, Grammar('start: "a"')),
    ],
)
def test_the_json_form(obj: dict[str, Any], expected: Any) -> None:
    assert from_json(obj) == expected


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        ({}, "an object with one of json_schema"),
        ({"regex": "a", "choice": ["a"]}, "an object with one of"),
        ({"choice": "ab"}, "structured_output.choice: expected a list of strings"),
        ({"json_object": False}, "structured_output.json_object: expected true"),
        ({"regex": 3}, "structured_output.regex: expected a string"),
    ],
)
def test_the_json_form_says_what_is_wrong(obj: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        from_json(obj)


def test_bench_lines_take_messages_and_structured_output(tmp_path: Path) -> None:
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 3,'
        ' "structured_output": {"choice": ["yes", "no"]}}\n'
        '{"prompt": "A user:", "structured_output": {"json_schema": {"type": "object"}}}\n'
    )
    first, second = load_prompts_file(jsonl, 9).specs
    assert first.prompt == (ChatMessage("user", "Hi"),)
    assert first.generate_options() == {
        "max_new_tokens": 3,
        "structured_output": Choice(["yes", "no"]),
    }
    assert second.generate_options()["structured_output"] == JsonSchema('{"type": "object"}')
    for line, says in (
        ('{"messages": [], "max_new_tokens": 3}', "'messages' must be a non-empty list"),
        ('{"prompt": "x", "messages": [{"role": "u", "content": "x"}]}', "without 'prompt'"),
        ('{"messages": ["hi"]}', "a chat message is"),
        ('{"prompt": "x", "structured_output": {"regex": 1}}', "structured_output.regex"),
    ):
        jsonl.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"chat.jsonl:1: .*{says}"):
            load_prompts_file(jsonl, 9)


def test_generate_flags(tmp_path: Path) -> None:
    parser = cli.build_parser()
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    args = parser.parse_args(["generate", "--message", "user=a=b", "--json-schema", str(schema)])
    assert args.message == [ChatMessage("user", "a=b")]
    assert cli._structured_output(args) == JsonSchema('{"type": "object"}')
    args = parser.parse_args(["generate", "x", "--choice", "a", "--choice", "b"])
    assert cli._structured_output(args) == Choice(["a", "b"])
    assert cli._structured_output(parser.parse_args(["generate", "x", "--json-object"])) == (
        JsonObject()
    )
    assert cli._structured_output(parser.parse_args(["generate", "x"])) is None
    with pytest.raises(SystemExit):  # two formats at once
        parser.parse_args(["generate", "x", "--regex", "a", "--json-object"])
    schema.write_text("{not json")
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "x", "--json-schema", str(schema)])


def test_generate_with_messages_and_a_format_against_the_daemon(
    make_daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    running: RunningDaemon = make_daemon(chat_template=str(template))
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "system", "content": "Be brief."}]))
    rendered = "[system] Be brief.\n[user] Hi\n[assistant]"
    base = ["generate", "--target", running.address, "--max-new-tokens", "4", "--json"]
    assert cli.main([*base, rendered]) == 0
    plain = json.loads(capsys.readouterr().out)
    code = cli.main([*base, "--messages", str(messages), "--message", "user=Hi", "--json-object"])
    assert code == 0
    chat = json.loads(capsys.readouterr().out)
    # The same prompt as the rendered text (the masks of --json-object land in the sampler).
    assert chat["prompt_tokens"] == plain["prompt_tokens"]
    assert cli.main([*base, "x", "--message", "user=Hi"]) == 2
    assert "give PROMPT or --token-ids or --message/--messages" in capsys.readouterr().err
    assert cli.main([*base, "x", "--regex", "(bad"]) == 1
    assert "structured_output.regex: " in capsys.readouterr().err


def test_bench_with_chat_lines_against_the_daemon(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    running: RunningDaemon = make_daemon(chat_template=str(template))
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 2,'
        ' "structured_output": {"choice": ["yes", "no"]}}\n'
        '{"messages": [{"role": "user", "content": "Bye"}], "max_new_tokens": 3}\n'
    )
    out = tmp_path / f"report-{time.monotonic_ns()}.json"
    code = cli.main(
        ["bench", "--no-progress", "--json", str(out), "--target", running.address,
         "--prompts-file", str(jsonl), "--requests", "4"]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0
    assert report["requests"] == {"sent": 4, "ok": 4, "errors": 0}
