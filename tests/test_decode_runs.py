"""``plan_decode_runs``: how a step's decoding rows are split into attention calls (no model).

A run is one SDPA call over neighbouring slots, each row read up to the run's longest row;
the plan must cover every row once, never span a slot with no decoding row, and read the
fewest columns plus ``RUN_CALL_COST`` per call (checked against every possible split)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve_server.engine.attention import RUN_CALL_COST, DecodeRun, plan_decode_runs


def cost(runs: tuple[DecodeRun, ...]) -> int:
    return sum(r.count * r.window + RUN_CALL_COST for r in runs)


def check_covers(slots: list[int], lengths: list[int], runs: tuple[DecodeRun, ...]) -> None:
    token = 0
    for run in runs:
        assert run.first_token == token
        rows = range(token, token + run.count)
        assert [slots[i] for i in rows] == list(range(run.first_slot, run.first_slot + run.count))
        assert run.window == max(lengths[i] for i in rows)
        assert run.ragged == (min(lengths[i] for i in rows) != run.window)
        token += run.count
    assert token == len(slots)


def every_split(slots: list[int], lengths: list[int]) -> int:
    """The cheapest split found by trying all of them (runs may not span a slot gap)."""
    n, best = len(slots), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or cuts[i - 1] or slots[i] != slots[i - 1] + 1:
                window = max(lengths[start:i])
                runs.append(DecodeRun(start, slots[start], i - start, window, False))
                start = i
        best = cost(tuple(runs)) if best is None else min(best, cost(tuple(runs)))
    assert best is not None
    return best


def test_rows_of_one_length_are_one_exact_call() -> None:
    assert plan_decode_runs([0, 1, 2, 3], [40] * 4) == (DecodeRun(0, 0, 4, 40, False),)


def test_a_long_row_among_short_ones_is_read_on_its_own() -> None:
    runs = plan_decode_runs(list(range(8)), [10, 12, 9, 11, 900, 10, 12, 8])
    assert [(r.first_slot, r.count, r.window) for r in runs] == [
        (0, 4, 12),
        (4, 1, 900),
        (5, 3, 12),
    ]
    assert cost(runs) < 8 * 900 + RUN_CALL_COST


def test_a_gap_in_the_slots_always_splits() -> None:
    runs = plan_decode_runs([0, 1, 5, 6], [7, 7, 7, 7])
    assert [(r.first_token, r.first_slot, r.count) for r in runs] == [(0, 0, 2), (2, 5, 2)]


def test_no_rows_no_runs() -> None:
    assert plan_decode_runs([], []) == ()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 400)), min_size=1, max_size=9))
def test_the_plan_covers_every_row_and_reads_least(rows: list[tuple[int, int]]) -> None:
    slots = list(itertools.accumulate(step for step, _ in rows))  # gaps where step > 1
    lengths = [length for _, length in rows]
    runs = plan_decode_runs(slots, lengths)
    check_covers(slots, lengths, runs)
    assert cost(runs) == every_split(slots, lengths)
