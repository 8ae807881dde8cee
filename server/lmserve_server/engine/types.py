"""The engine core's domain types: what a request asks of the engine and what it gets back.

They sit between the gRPC layer (which builds them from protobuf) and the engine (which
knows nothing of gRPC), so both can be tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the grammar library is imported where grammars are compiled, not here
    from lmserve_server.grammar.matcher import CompiledGrammar


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy decoding (of the logits
    after the bias and the penalties)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely
    seed: int | None = None
    repetition_penalty: float = 1.0  # transformers': over the prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI's: once per token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: per occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One request: a tokenized prompt and how to continue it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # end the row like EOS, finish reason STOP
    min_new_tokens: int = 0  # EOS and stop tokens are suppressed until this many exist
    logprobs: int | None = None  # None: none; N: the chosen token's and the top N
    # Prompt prefixes are shared (prefix cache) only between requests with the same salt.
    cache_salt: str = ""
    # structured_output, compiled before the request is queued; a row makes its matcher
    # with grammar.matcher(). None: free text.
    grammar: CompiledGrammar | None = field(default=None, compare=False, repr=False)

    @property
    def needs_sampler(self) -> bool:
        """Whether choosing its tokens takes more than the argmax of the raw logits."""
        sampling = self.sampling
        return (
            not sampling.greedy
            or sampling.penalised
            or bool(sampling.logit_bias)
            or self.min_new_tokens > 0
            or self.logprobs is not None
            or self.grammar is not None
        )

    @property
    def total_tokens(self) -> int:
        """The most KV-cache positions it can need: its prompt and every new token."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the top alternatives at its step (most
    likely first), from the distribution it was drawn from."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationOutput:
    """One request's result: the continuation alone, without the prompt or the EOS token."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked
    cached_prompt_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass(frozen=True)
class TextDelta:
    """What a stream may send now: new text and the token ids that produced it (with their
    logprobs when asked). The deltas of a request concatenate to a prefix of its final text,
    token ids and logprobs."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class KVCacheBlocks:
    """The KV cache's blocks now: all of them, those in rows' tables, those a row may take
    (free, or cached prompt blocks no row holds), and the rows preempted since start."""

    total: int = 0
    held: int = 0
    available: int = 0
    preemptions: int = 0

    @property
    def usage(self) -> float:
        return self.held / self.total if self.total else 0.0


@dataclass(frozen=True)
class PrefixCacheStats:
    """The prefix cache's counters: prompt tokens looked up and found since start, and the
    tokens it holds now, can hold, and has evicted."""

    queries: int = 0
    hits: int = 0
    tokens: int = 0
    capacity_tokens: int = 0
    evicted_tokens: int = 0
