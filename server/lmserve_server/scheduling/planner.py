"""``StepPlanner``: what the next continuous step runs. It only decides; it runs nothing.

Each step has a token budget (``--max-step-tokens``), spent in this order:

1. every decoding row gets its next token (one each; the budget always covers them);
2. rows still prefilling continue their prompts, oldest first, in chunks of what is left;
3. waiting requests are admitted, oldest first, while a KV slot is free, the running rows
   are fewer than ``max_rows`` and budget is left; each starts its prompt in this step.

So a burst of long prompts is prefilled a chunk per step while the running rows keep
decoding: a decoding row (and its stream) never waits longer than one step's budget.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self, prompt_left: Sequence[int], waiting_prompts: Sequence[int], free_slots: int
    ) -> Plan:
        """``prompt_left``: the running rows in admission order, how much of each one's
        prompt is not yet in the cache (0: it decodes); ``waiting_prompts``: the prompt
        lengths of the waiting requests, oldest first."""
        plan = Plan(decode=[i for i, left in enumerate(prompt_left) if left == 0])
        budget = self.max_step_tokens - len(plan.decode)
        for i, left in enumerate(prompt_left):
            if left and budget:
                chunk = min(left, budget)
                plan.prefill.append((i, chunk))
                budget -= chunk
        rows = len(prompt_left)
        for length in waiting_prompts:
            if not (budget and free_slots and rows < self.max_rows):
                break
            chunk = min(length, budget)
            plan.admit.append(chunk)
            budget -= chunk
            free_slots -= 1
            rows += 1
        return plan
