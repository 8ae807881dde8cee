"""The continuous scheduler's decisions alone, without a model: the token budget, chunked
prefill, admission by free KV slots."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmserve_server.engine.kv_cache import KVCache, KVCacheShape, plan_capacity
from lmserve_server.engine.prefix_cache import BLOCK
from lmserve_server.scheduling.planner import Plan, StepPlanner, chunk


def tokens(plan: Plan) -> int:
    """The tokens a plan puts through the model."""
    return len(plan.decode) + sum(n for _, n in plan.prefill) + sum(plan.admit)


def test_decoding_rows_go_first_then_prefills_then_admissions() -> None:
    planner = StepPlanner(max_rows=8, max_step_tokens=16)
    plan = planner.plan([0, 0, 5, 0], [4, 20, 3], free_slots=4)
    assert plan.decode == [0, 1, 3]
    assert plan.prefill == [(2, 5)]
    assert plan.admit == [4, 4]  # 16 - 3 - 5 = 8 left: 4 for the first, 4 of the second's 20
    assert tokens(plan) == 16


def test_a_long_prompt_is_prefilled_a_chunk_per_step_beside_the_decoding_rows() -> None:
    planner = StepPlanner(max_rows=4, max_step_tokens=10)
    left, steps = 37, 0
    plan = planner.plan([0, 0], [left], free_slots=2)
    assert plan.admit == [8]
    left -= 8
    while left:
        plan = planner.plan([0, 0, left], [], free_slots=1)
        assert plan.decode == [0, 1], "the running rows decode every step"
        assert plan.prefill == [(2, min(8, left))]
        left -= plan.prefill[0][1]
        steps += 1
    assert steps == 4


def test_admission_waits_for_a_free_slot_and_for_the_row_limit() -> None:
    planner = StepPlanner(max_rows=3, max_step_tokens=100)
    assert planner.plan([0], [5, 5, 5], free_slots=1).admit == [5]
    assert planner.plan([0], [5, 5, 5], free_slots=0).admit == []
    assert planner.plan([0, 0], [5, 5], free_slots=5).admit == [5]  # 3 rows at most


def test_no_prompt_token_is_left_to_a_one_token_chunk() -> None:
    """A step runs a one-token chunk as a decoding row, not in the prefill's tiles, so a
    longer prompt never gets (or is left with) a single token."""
    assert [chunk(left, 8) for left in (1, 2, 8, 9, 10, 30)] == [1, 2, 8, 7, 8, 8]
    assert chunk(3, 2) == 0 and chunk(5, 1) == 0 and chunk(4, 3) == 2
    planner = StepPlanner(max_rows=4, max_step_tokens=10)
    assert planner.plan([0, 0, 9], [5], free_slots=1).prefill == [(2, 7)]  # not 8, then 1
    crowded = StepPlanner(max_rows=12, max_step_tokens=13)  # 11 decoding rows leave 2
    assert crowded.plan([0] * 11, [3], free_slots=1).admit == []  # 2 + 1 or 1 + 2: wait
    assert crowded.plan([0] * 11, [2], free_slots=1).admit == [2]


def test_the_budget_must_leave_room_to_prefill() -> None:
    with pytest.raises(ValueError, match="--max-step-tokens"):
        StepPlanner(max_rows=32, max_step_tokens=32)


@given(
    running=st.lists(st.integers(0, 300), max_size=12),
    waiting=st.lists(st.integers(1, 300), max_size=12),
    free=st.integers(0, 12),
    budget=st.integers(13, 512),
)
def test_a_plan_keeps_every_rule(
    running: list[int], waiting: list[int], free: int, budget: int
) -> None:
    planner = StepPlanner(max_rows=12, max_step_tokens=budget)
    plan = planner.plan(running, waiting, free_slots=free)
    assert tokens(plan) <= budget
    assert plan.decode == [i for i, left in enumerate(running) if left == 0]
    assert all(0 < n <= running[i] for i, n in plan.prefill)
    assert len(plan.admit) <= min(free, 12 - len(running), len(waiting))
    assert all(0 < n <= length for n, length in zip(plan.admit, waiting, strict=False))
    # A prompt of two tokens or more is never given one token, nor left with one.
    chunks = [(n, running[i]) for i, n in plan.prefill] + list(
        zip(plan.admit, waiting, strict=False)
    )
    assert all(n == left or (n >= 2 and left - n >= 2) for n, left in chunks)
    # Work is never left undone while budget remains (at most the two tokens that the rule
    # above can leave): the oldest prefill goes whole first.
    if tokens(plan) < budget - 2:
        assert all(n == running[i] for i, n in plan.prefill)
        assert all(n == length for n, length in zip(plan.admit, waiting, strict=False))


SHAPE = KVCacheShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)


def test_rows_take_blocks_lowest_first_and_give_them_back_without_copies() -> None:
    cache = KVCache(SHAPE, slots=3, tokens=4 * BLOCK, device=torch.device("cpu"))
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    assert cache.allocate() is None
    pool = cache.pool
    first = pool.take(3)
    assert first == [0, 1, 2] and pool.take(2) is None and pool.available == 1
    cache.keys[0][0, 1, 0, 0] = 5.0
    pool.release(first[1:2])
    assert pool.take(1) == [1]
    assert cache.keys[0][0, 1, 0, 0] == 5.0  # nothing was moved or cleared
    with pytest.raises(ValueError):
        pool.release([3])
    assert cache.keys[0].shape == (2, 5, BLOCK, 4), "one scratch block past the last"


def test_capacity_is_the_budget_or_a_context_per_row_within_the_memory_share() -> None:
    assert plan_capacity(SHAPE, rows=4, context=1024) == 4096
    assert plan_capacity(SHAPE, rows=4, context=1024, tokens=2000) == 1984  # whole blocks
    per_token = SHAPE.bytes_per_token  # 2 x 2 layers x 2 heads x 4 x 4 bytes = 128
    assert per_token == 128
    assert (
        plan_capacity(SHAPE, rows=4, context=1024, free_bytes=128 * 1000, memory_fraction=0.5)
        == 480
    )
    with pytest.raises(ValueError, match="--kv-cache-tokens"):
        plan_capacity(SHAPE, rows=4, context=1024, tokens=3)
