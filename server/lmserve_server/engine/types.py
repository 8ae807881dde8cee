"""The engine core's domain types: what a request asks of the engine and what it gets back.

They sit between the gRPC layer (which builds them from protobuf) and the engine (which
knows nothing of gRPC), so both can be tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


@dataclass(frozen=True)
class GenerationRequest:
    """One request: a tokenized prompt and how to continue it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()

    @property
    def total_tokens(self) -> int:
        """The most KV-cache positions it can need: its prompt and every new token."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class GenerationOutput:
    """One request's result: the continuation alone, without the prompt or the EOS token."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason


@dataclass(frozen=True)
class TextDelta:
    """What a stream may send now: new text and the token ids that produced it. The deltas
    of a request concatenate to a prefix of its final text and token ids."""

    text: str
    token_ids: tuple[int, ...]
