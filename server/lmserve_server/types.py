"""The daemon's domain types: what a request asks of the engine and what it gets back.

They sit between the gRPC layer (which builds them from protobuf) and the engine (which
knows nothing of gRPC), so both can be tested alone.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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


class RowControl:
    """The live side of a request inside a running batch, shared by the event loop (which
    sets ``cancelled`` when the caller goes away) and the engine thread (which reads it each
    decode step, and calls ``on_token`` with each new token of a streamed request).

    A plain attribute is enough across the threads: one writer, and a late read costs one
    decode step at most.
    """

    def __init__(self, on_token: Callable[[int], object] | None = None) -> None:
        self.on_token = on_token
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a batch: a tokenized prompt and how to continue it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    control: RowControl | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenerationOutput:
    """One row's result: the continuation alone, without the prompt or the EOS token."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason


def affinity(request: GenerationRequest) -> float:
    """Requests with close values waste little on each other in one static batch: every
    row computes until the batch's longest finishes, and pads to its longest prompt."""
    return request.max_new_tokens + 0.25 * len(request.prompt_ids)


def padded_tokens(batch: Sequence[GenerationRequest]) -> int:
    """What a batch costs in memory: every row is padded to the longest prompt and runs
    (in the worst case) to the largest max_new_tokens."""
    longest = max(len(r.prompt_ids) for r in batch)
    return len(batch) * (longest + max(r.max_new_tokens for r in batch))
