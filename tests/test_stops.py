"""Stop strings found as a row's text grows (``stops.py``), against the definitions by brute
force: where the earliest stop string ending in the new text begins, and how long a tail of
the text a stop string begins with (what a stream holds back)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve_server.engine.stops import StopScan


def earliest_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Where the earliest stop string ending at or after ``new_from`` begins."""
    found = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (found is None or at < found):
            found = at
    return found


def held_back(text: str, stops: Sequence[str]) -> int:
    """The longest tail of ``text`` that a stop string begins with."""
    return max(
        (
            n
            for stop in stops
            for n in range(1, min(len(stop), len(text) + 1))
            if text.endswith(stop[:n])
        ),
        default=0,
    )


@pytest.mark.parametrize(
    ("pieces", "found"),
    [
        (["hello", " world"], 6),
        (["one ", "STOP two END"], 4),  # both in one piece: the earlier
        (["one two ", "EN", "D"], 8),  # across pieces
        (["abcd"], 0),  # "abcd" begins before "c", which ends first
        (["ab", "c", "d"], 2),  # "c" ends first, in its own piece: the row stops there
    ],
)
def test_the_earliest_stop_string_ending_in_a_new_piece(pieces: list[str], found: int) -> None:
    scan = StopScan(("world", "STOP", "END", "abcd", "c"))
    offset, result = 0, None
    for piece in pieces:
        result = scan.feed(piece, offset)
        offset += len(piece)
        if result is not None:
            break
    assert result == found


def test_a_stream_holds_back_what_a_stop_string_begins_with() -> None:
    scan = StopScan(("three f", "c", "bcd", "x"))
    scan.feed("one two thr", 0)
    assert scan.held == 3
    scan = StopScan(("c", "bcd", "x"))
    assert scan.feed("ab", 0) is None
    assert scan.held == 1  # "b" begins "bcd"


alphabet = st.sampled_from("abc")


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet, min_size=1, max_size=6), min_size=1, max_size=5),
    pieces=st.lists(st.text(alphabet, max_size=5), max_size=12),
)
def test_scanning_piece_by_piece_is_the_definition(stops: list[str], pieces: list[str]) -> None:
    scan = StopScan(tuple(stops))
    text = ""
    for piece in pieces:
        before = len(text)
        text += piece
        found = scan.feed(piece, before)
        assert found == earliest_stop(text, stops, before)
        if found is not None:
            return  # the row ends: nothing more is fed
        assert scan.held == held_back(text, stops)
