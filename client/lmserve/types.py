"""Typed results of the lmserve API, and the conversions to and from its protobuf messages.

``Client`` and ``AsyncClient`` share everything here, so the two stay thin wrappers around
the transport: ``build_request`` makes the ``GenerateRequest`` and the ``*_from_proto``
functions turn responses into frozen dataclasses that hold no protobuf objects.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias, TypedDict, cast

from lmserve.structured import (
    ChatMessage,
    StructuredOutput,
    is_conversation,
    messages_proto,
    structured_output_proto,
)
from lmserve.v1 import lmserve_pb2

# What to continue: text, token ids, or a conversation (rendered by the server's chat
# template; a message may also be a {"role": ..., "content": ...} dict).
Prompt: TypeAlias = str | Sequence[int] | Sequence[ChatMessage | Mapping[str, str]]


class FinishReason(str, enum.Enum):
    """Why generation stopped. A ``str`` enum, so it compares equal to and prints as its value."""

    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    UNSPECIFIED = "unspecified"

    @classmethod
    def from_proto(cls, value: int) -> FinishReason:
        """The member for a ``lmserve.v1.FinishReason`` value; unknown values (a newer
        server) read as UNSPECIFIED rather than failing."""
        return _FINISH_REASONS.get(value, cls.UNSPECIFIED)

    def __str__(self) -> str:
        return self.value


_FINISH_REASONS: dict[int, FinishReason] = {
    lmserve_pb2.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    lmserve_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    lmserve_pb2.FINISH_REASON_EOS: FinishReason.EOS,
    lmserve_pb2.FINISH_REASON_STOP: FinishReason.STOP,
}


def _jsonable(obj: Any) -> dict[str, Any]:
    # asdict keeps tuples and enum members; make both plain JSON types.
    out = dataclasses.asdict(obj)
    for key, value in out.items():
        if isinstance(value, tuple):
            out[key] = list(value)
        elif isinstance(value, enum.Enum):
            out[key] = value.value
    return out


class GenerateOptions(TypedDict, total=False):
    """How to continue a prompt: the keyword arguments of ``generate`` and ``stream``.

    Unset (or None) optional fields are not sent, so the server's defaults apply.
    """

    max_new_tokens: int  # 0: the server's default
    temperature: float | None  # unset or 0: greedy
    top_p: float | None  # nucleus sampling, in (0, 1]
    top_k: int | None  # keep the k most likely; 0: no limit
    min_p: float | None  # keep tokens at least min_p times as likely as the top one; [0, 1]
    seed: int | None  # the same seed, the same sample
    stop: str | Iterable[str]  # end before any of these strings (a str is one string)
    stop_token_ids: Iterable[int]  # end at any of these tokens (finish reason STOP)
    min_new_tokens: int | None  # no end token before this many tokens
    repetition_penalty: float | None  # > 0, transformers' meaning; 1 changes nothing
    presence_penalty: float | None  # in [-2, 2], OpenAI's meaning
    frequency_penalty: float | None  # in [-2, 2], OpenAI's meaning
    logit_bias: Mapping[int, float] | None  # token id -> added to its logit, [-100, 100]
    logprobs: int | None  # 0-20: each token's logprob and this many top alternatives
    structured_output: StructuredOutput | None  # JsonSchema, JsonObject, Regex, Choice, Grammar
    # Cached prompt prefixes are shared only between requests with the same salt ("": one
    # group of its own); give each tenant its own.
    cache_salt: str | None


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` alternatives at its step as
    (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A finished continuation and how the server served it.

    ``text`` is the continuation only (not the prompt). ``batch_size`` is the most requests
    (this one included) in one forward pass of the model this request took part in;
    ``queue_ms`` the time from the server accepting it to its first forward pass;
    ``compute_ms`` from there to its result. ``logprobs`` has one entry per token when the
    request asked for them. ``cached_prompt_tokens``: of ``prompt_tokens``, those the
    server's prefix cache held (their keys and values were not computed again).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    batch_size: int
    queue_ms: float
    compute_ms: float
    logprobs: tuple[TokenLogprob, ...] = ()
    cached_prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for ids, the finish reason as its string)."""
        return _jsonable(self)


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """The text and token ids produced since the previous chunk of a stream (with their
    logprobs when asked for).

    ``finish_reason`` is None on every chunk but the last, which also says how the request
    was served (``prompt_tokens`` ... ``cached_prompt_tokens``, as in ``GenerationResult``;
    0 on the other chunks).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    cached_prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for ids, the finish reason as its string or None)."""
        return _jsonable(self)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's batching settings."""

    model: str
    device: str
    dtype: str
    max_context: int
    eos_token_id: int
    max_batch_size: int
    max_wait_ms: float | None  # static scheduler only
    max_new_tokens_cap: int
    default_max_new_tokens: int
    scheduler: str = ""  # "static" or "continuous" ("" from servers before it was reported)
    max_request_tokens: int = 0  # prompt + max_new_tokens of one request, at most
    kv_cache_tokens: int = 0  # continuous: the preallocated KV cache
    max_step_tokens: int = 0  # continuous: tokens per step
    max_batch_tokens: int = 0  # static: padded tokens per batch (0: no limit)
    # "gguf" (a GGUF file, dequantized to dtype) or "transformers"; "" from older servers.
    weights_format: str = ""
    gguf_file_type: str = ""  # a GGUF file's quantization, e.g. "Q4_1"; "" otherwise

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return _jsonable(self)


def build_request(prompt: Prompt, **options: Any) -> lmserve_pb2.GenerateRequest:
    """The ``GenerateRequest`` for ``prompt`` (text, token ids, or chat messages) and
    ``GenerateOptions``.

    Optional fields are set only when given (not None), so the server can tell "unset" from
    an explicit value such as ``temperature=0.0``. A bare string for ``stop`` is one stop
    string, not a sequence of one-character ones.
    """
    unknown = set(options) - set(GenerateOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown generate option(s): {', '.join(sorted(unknown))}")
    stop = options.get("stop", ())
    request = lmserve_pb2.GenerateRequest(
        max_new_tokens=options.get("max_new_tokens", 0),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(options.get("stop_token_ids", ())),
        logit_bias=dict(options.get("logit_bias") or {}),
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    elif is_conversation(items := list(prompt)):
        request.messages.extend(messages_proto(items))
    else:
        request.prompt_token_ids.extend(cast("list[int]", items))
    if options.get("structured_output") is not None:
        request.structured_output.CopyFrom(structured_output_proto(options["structured_output"]))
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "min_new_tokens",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "cache_salt",
    ):
        if options.get(name) is not None:
            setattr(request, name, options[name])
    return request


def _logprobs_from_proto(messages: Iterable[lmserve_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top))
        for m in messages
    )


def result_from_proto(msg: lmserve_pb2.GenerateResponse) -> GenerationResult:
    """A ``GenerationResult`` from a ``GenerateResponse``."""
    return GenerationResult(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        finish_reason=FinishReason.from_proto(msg.finish_reason),
        batch_size=msg.batch_size,
        queue_ms=msg.queue_ms,
        compute_ms=msg.compute_ms,
        logprobs=_logprobs_from_proto(msg.logprobs),
        cached_prompt_tokens=msg.cached_prompt_tokens,
    )


def chunk_from_proto(msg: lmserve_pb2.GenerateStreamResponse) -> StreamChunk:
    """A ``StreamChunk`` from a ``GenerateStreamResponse``; UNSPECIFIED reads as None,
    since the server leaves finish_reason unset on all but the last message."""
    reason = FinishReason.from_proto(msg.finish_reason)
    return StreamChunk(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=None if reason is FinishReason.UNSPECIFIED else reason,
        logprobs=_logprobs_from_proto(msg.logprobs),
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        batch_size=msg.batch_size,
        queue_ms=msg.queue_ms,
        compute_ms=msg.compute_ms,
        cached_prompt_tokens=msg.cached_prompt_tokens,
    )


def model_info_from_proto(msg: lmserve_pb2.ModelInfo) -> ModelInfo:
    """A ``ModelInfo`` from the protobuf ``ModelInfo``."""
    return ModelInfo(
        model=msg.model,
        device=msg.device,
        dtype=msg.dtype,
        max_context=msg.max_context,
        eos_token_id=msg.eos_token_id,
        max_batch_size=msg.max_batch_size,
        max_wait_ms=msg.max_wait_ms if msg.HasField("max_wait_ms") else None,
        max_new_tokens_cap=msg.max_new_tokens_cap,
        default_max_new_tokens=msg.default_max_new_tokens,
        scheduler=msg.scheduler,
        max_request_tokens=msg.max_request_tokens,
        kv_cache_tokens=msg.kv_cache_tokens,
        max_step_tokens=msg.max_step_tokens,
        max_batch_tokens=msg.max_batch_tokens,
        weights_format=msg.weights_format,
        gguf_file_type=msg.gguf_file_type,
    )
