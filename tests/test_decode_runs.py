"""``plan_decode_runs``: how a step's decoding rows are split into attention calls (no model).

The rows come shortest first; a run is one SDPA call over consecutive rows, each read up to
the run's longest (its last) row. The plan must cover every row once, in order, and read
the fewest columns plus ``RUN_CALL_COST`` per call (checked against every possible split)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve_server.engine.attention import RUN_CALL_COST, plan_decode_runs


def cost(lengths: list[int], runs: list[tuple[int, int]]) -> int:
    return sum(n * lengths[first + n - 1] + RUN_CALL_COST for first, n in runs)


def every_split(lengths: list[int]) -> int:
    """The cheapest split found by trying all of them."""
    n, best = len(lengths), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or cuts[i - 1]:
                runs.append((start, i - start))
                start = i
        best = cost(lengths, runs) if best is None else min(best, cost(lengths, runs))
    assert best is not None
    return best


def test_rows_of_one_length_are_one_call() -> None:
    assert plan_decode_runs([40] * 4) == [(0, 4)]


def test_a_long_row_among_short_ones_is_read_on_its_own() -> None:
    lengths = [8, 9, 10, 10, 11, 12, 12, 900]
    runs = plan_decode_runs(lengths)
    assert runs == [(0, 7), (7, 1)]
    assert cost(lengths, runs) < 8 * 900 + RUN_CALL_COST


def test_no_rows_no_runs() -> None:
    assert plan_decode_runs([]) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=9))
def test_the_plan_covers_every_row_and_reads_least(unsorted: list[int]) -> None:
    lengths = sorted(unsorted)
    runs = plan_decode_runs(lengths)
    assert [first for first, _ in runs] == list(
        itertools.accumulate((n for _, n in runs[:-1]), initial=0)
    )
    assert sum(n for _, n in runs) == len(lengths)
    assert cost(lengths, runs) == every_split(lengths)
