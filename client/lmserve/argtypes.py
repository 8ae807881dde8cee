"""argparse value types shared by the client's commands: each refuses a bad value with a
message that says what was wrong with it."""

from __future__ import annotations

import argparse


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
