"""The daemon's domain types: what a request asks of the engine and what it gets back.

They sit between the gRPC layer (which builds them from protobuf) and the engine (which
knows nothing of gRPC), so both can be tested alone.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Hashable
from dataclasses import dataclass

_exclusive_keys = itertools.count()


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def batch_key(self) -> Hashable:
        """Requests with equal keys can share one ``generate`` call.

        Greedy requests all share (top_p/top_k/seed mean nothing without sampling). A seeded
        sample runs alone: with one random stream per call, its tokens would otherwise depend
        on its neighbours. Per-row samplers (a later issue) lift both limits.
        """
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", next(_exclusive_keys))
        return ("sample", self.temperature, self.top_p, self.top_k)


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a batch: a tokenized prompt and how to continue it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationOutput:
    """One row's result: the continuation alone, without the prompt or the EOS token."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
