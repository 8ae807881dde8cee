"""Typed arguments for structured output and chat prompts, and their protobuf messages.

``structured_output=`` of ``generate``/``stream`` takes one of ``JsonSchema``,
``JsonObject``, ``Regex``, ``Choice`` or ``Grammar``; a prompt may be a conversation, a
sequence of ``ChatMessage`` (or ``{"role": ..., "content": ...}`` dicts)::

    client.generate(
        [ChatMessage("user", "Name a colour")], structured_output=Choice(["red", "blue"])
    )
    client.generate("A user:", structured_output=JsonSchema({"type": "object", ...}))

``from_json`` reads the same from plain JSON (the bench's JSONL lines, the CLI's files).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias, TypeGuard

from lmserve.v1 import lmserve_pb2


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation: ``role`` as the model's chat template knows it
    (usually "system", "user" or "assistant") and its ``content``."""

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class JsonSchema:
    """The continuation is compact JSON valid under ``schema`` (a JSON Schema, as a dict or
    as JSON text)."""

    schema: str | Mapping[str, Any]

    @property
    def text(self) -> str:
        return self.schema if isinstance(self.schema, str) else json.dumps(self.schema)


@dataclasses.dataclass(frozen=True)
class JsonObject:
    """The continuation is a compact JSON object, of any shape."""


@dataclasses.dataclass(frozen=True)
class Regex:
    """The whole continuation matches ``pattern`` (Rust's regex syntax, no lookaround)."""

    pattern: str


@dataclasses.dataclass(frozen=True)
class Choice:
    """The continuation is exactly one of ``options``."""

    options: tuple[str, ...]

    def __init__(self, options: Iterable[str]) -> None:
        if isinstance(options, str):  # a bare string would be a choice of its characters
            raise TypeError("Choice takes a list of options, not one string")
        object.__setattr__(self, "options", tuple(options))


@dataclasses.dataclass(frozen=True)
class Grammar:
    """The continuation is a sentence of ``text``, a grammar in llguidance's Lark-like
    EBNF (see the README)."""

    text: str


StructuredOutput: TypeAlias = JsonSchema | JsonObject | Regex | Choice | Grammar


def structured_output_proto(value: StructuredOutput) -> lmserve_pb2.StructuredOutput:
    """The ``lmserve.v1.StructuredOutput`` of ``value``."""
    if isinstance(value, JsonSchema):
        return lmserve_pb2.StructuredOutput(json_schema=value.text)
    if isinstance(value, JsonObject):
        return lmserve_pb2.StructuredOutput(json_object=True)
    if isinstance(value, Regex):
        return lmserve_pb2.StructuredOutput(regex=value.pattern)
    if isinstance(value, Choice):
        return lmserve_pb2.StructuredOutput(choice=lmserve_pb2.Choice(options=list(value.options)))
    if isinstance(value, Grammar):
        return lmserve_pb2.StructuredOutput(grammar=value.text)
    raise TypeError(
        "structured_output: expected JsonSchema, JsonObject, Regex, Choice or Grammar, "
        f"not {type(value).__name__}"
    )


def is_conversation(items: list[Any]) -> TypeGuard[list[ChatMessage | Mapping[str, Any]]]:
    """Whether a prompt given as a list is chat messages (rather than token ids)."""
    return bool(items) and all(isinstance(m, (ChatMessage, Mapping)) for m in items)


def chat_message(value: ChatMessage | Mapping[str, Any]) -> ChatMessage:
    """A ``ChatMessage`` from itself or a ``{"role": ..., "content": ...}`` mapping."""
    if isinstance(value, ChatMessage):
        return value
    role, content = value.get("role"), value.get("content")
    if (
        not isinstance(role, str)
        or not isinstance(content, str)
        or set(value) - {"role", "content"}
    ):
        raise ValueError(f"a chat message is {{'role': str, 'content': str}}, not {dict(value)!r}")
    return ChatMessage(role, content)


def messages_proto(
    messages: Iterable[ChatMessage | Mapping[str, Any]],
) -> list[lmserve_pb2.ChatMessage]:
    return [
        lmserve_pb2.ChatMessage(role=m.role, content=m.content) for m in map(chat_message, messages)
    ]


# The JSON form: an object with exactly one of these keys.
_JSON_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def from_json(obj: Any) -> StructuredOutput:
    """The structured output of a JSON object with one key: ``{"json_schema": {...}}`` (or
    its text), ``{"json_object": true}``, ``{"regex": "..."}``, ``{"choice": ["a", "b"]}``
    or ``{"grammar": "..."}``; ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(obj, dict) or len(obj) != 1 or next(iter(obj)) not in _JSON_KINDS:
        raise ValueError(f"structured_output: an object with one of {', '.join(_JSON_KINDS)}")
    kind, value = next(iter(obj.items()))
    if kind == "json_schema" and isinstance(value, (dict, bool, str)):
        return JsonSchema(value if isinstance(value, str) else json.dumps(value))
    if kind == "json_object" and value is True:
        return JsonObject()
    if kind == "choice" and isinstance(value, list) and all(isinstance(o, str) for o in value):
        return Choice(value)
    if kind in ("regex", "grammar") and isinstance(value, str):
        return Regex(value) if kind == "regex" else Grammar(value)
    expected = {
        "json_schema": "a schema object or its JSON text",
        "json_object": "true",
        "choice": "a list of strings",
    }.get(kind, "a string")
    raise ValueError(f"structured_output.{kind}: expected {expected}")
