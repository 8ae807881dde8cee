"""``StepPlanner``: what the next continuous step runs. It only decides; it runs nothing.

Each step has a token budget (``--max-step-tokens``), spent in this order:

1. every decoding row gets its next token (one each; the budget always covers them);
2. rows still prefilling continue their prompts, oldest first, in chunks of what is left;
3. waiting requests are admitted, oldest first, while a KV slot is free, the running rows
   are fewer than ``max_rows`` and budget is left; each starts its prompt in this step.

So a burst of long prompts is prefilled a chunk per step while the running rows keep
decoding: a decoding row (and its stream) never waits longer than one step's budget.

A prompt of two tokens or more never gets a chunk of one token (``chunk``): a step runs a
one-token chunk as a decoding row, and a prompt token's keys and values must come out of the
prefill's tiles whatever the chunking (``engine/attention.py``), or a prompt chunked one way
would not give the bits it gives chunked another (or cached).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Plan:
    """Indices into the planner's inputs: ``decode`` and ``prefill`` into ``running``
    (with the chunk's length), ``admit`` the first k waiting requests with theirs."""

    decode: list[int] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)
    admit: list[int] = field(default_factory=list)  # the first chunk of waiting request i


class StepPlanner:
    def __init__(self, *, max_rows: int, max_step_tokens: int) -> None:
        if max_step_tokens <= max_rows:
            raise ValueError(
                f"--max-step-tokens ({max_step_tokens}) must exceed --max-batch-size "
                f"({max_rows}): a step gives every running row a token, then prefills"
            )
        self.max_rows = max_rows
        self.max_step_tokens = max_step_tokens

    def plan(
        self, prompt_left: Sequence[int], waiting_prompts: Iterable[int], free_slots: int
    ) -> Plan:
        """``prompt_left``: the running rows in admission order, how much of each one's
        prompt is not yet in the cache (0: it decodes); ``waiting_prompts``: the prompt
        lengths of the waiting requests, oldest first, read only as far as one past the
        last admitted (so a caller may compute them lazily)."""
        plan = Plan(decode=[i for i, left in enumerate(prompt_left) if left == 0])
        budget = self.max_step_tokens - len(plan.decode)
        for i, left in enumerate(prompt_left):
            size = chunk(left, budget)
            if size:
                plan.prefill.append((i, size))
                budget -= size
        rows = len(prompt_left)
        for length in waiting_prompts:
            size = chunk(length, budget)
            if not (size and free_slots and rows < self.max_rows):
                break
            plan.admit.append(size)
            budget -= size
            free_slots -= 1
            rows += 1
        return plan


def chunk(left: int, budget: int) -> int:
    """How much of a prompt with ``left`` tokens to go gets ``budget`` tokens of a step: as
    much as fits, but never one token of a longer prompt, now or as its last chunk (0:
    none this step)."""
    if left <= budget:
        return left
    size = budget if left - budget > 1 else budget - 1
    return size if size > 1 else 0
