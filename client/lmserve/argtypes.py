"""argparse value types shared by the client's commands: each refuses a bad value with a
message that says what was wrong with it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmserve.structured import ChatMessage
from lmserve.structured import chat_message as _chat_message


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None


def positive_int(value: str) -> int:
    number = _int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return number


def non_negative_int(value: str) -> int:
    number = _int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return number


def token_ids(value: str) -> list[int]:
    """Comma- or space-separated token ids: ``15496,2159``."""
    parts = value.replace(",", " ").split()
    if not parts:
        raise argparse.ArgumentTypeError("no token ids given")
    return [non_negative_int(part) for part in parts]


def logit_bias(value: str) -> tuple[int, float]:
    """``TOKEN=BIAS``: a token id and what to add to its logit."""
    token, sep, bias = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected TOKEN=BIAS, got {value!r}")
    try:
        return non_negative_int(token.strip()), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {bias!r}") from None


def chat_message(value: str) -> ChatMessage:
    """``ROLE=CONTENT``: one message of a conversation."""
    role, sep, content = value.partition("=")
    if not sep or not role.strip():
        raise argparse.ArgumentTypeError(f"expected ROLE=CONTENT, got {value!r}")
    return ChatMessage(role.strip(), content)


def text_file(path: str) -> str:
    """A UTF-8 file's text; ``-`` reads stdin."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err}") from None


def _json_file(path: str) -> Any:
    try:
        return json.loads(text_file(path))
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{path}: not JSON: {err}") from None


def json_schema_file(path: str) -> str:
    """A JSON Schema file, as its text (checked to be JSON here; the server says whether it
    is a schema it can enforce)."""
    text = text_file(path)
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{path}: not JSON: {err}") from None
    return text


def messages_file(path: str) -> list[ChatMessage]:
    """A JSON list of ``{"role": ..., "content": ...}``."""
    value = _json_file(path)
    if not isinstance(value, list) or not value:
        raise argparse.ArgumentTypeError(f"{path}: expected a non-empty JSON list of messages")
    try:
        return [_chat_message(m) if isinstance(m, dict) else _not_a_message(m) for m in value]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{path}: {err}") from None


def _not_a_message(value: Any) -> ChatMessage:
    raise ValueError(f"a chat message is an object with role and content, not {value!r}")
