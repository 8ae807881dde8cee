"""Typed results of the lmserve API, and the conversions to and from its protobuf messages.

``Client`` and ``AsyncClient`` share everything here, so the two stay thin wrappers around
the transport: ``build_request`` makes the ``GenerateRequest`` and the ``*_from_proto``
functions turn responses into frozen dataclasses that hold no protobuf objects.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

from lmserve.v1 import lmserve_pb2


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


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A finished continuation and how the server served it.

    ``text`` is the continuation only (not the prompt). ``batch_size`` is the number of
    rows in the micro-batch this request ran in; ``queue_ms`` the time it waited in the
    server's queue; ``compute_ms`` the wall time of that batch's generate call.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    batch_size: int
    queue_ms: float
    compute_ms: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for ids, the finish reason as its string)."""
        return _jsonable(self)


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """The text and token ids produced since the previous chunk of a stream.

    ``finish_reason`` is None on every chunk but the last.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None

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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return _jsonable(self)


def build_request(
    prompt: str,
    *,
    max_new_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] = (),
) -> lmserve_pb2.GenerateRequest:
    """The ``GenerateRequest`` for these arguments.

    The optional sampling fields are set only when given (not None), so the server can
    tell "unset" from an explicit value such as ``temperature=0.0``. A bare string for
    ``stop`` is one stop string, not a sequence of one-character ones.
    """
    stops = [stop] if isinstance(stop, str) else list(stop)
    request = lmserve_pb2.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, stop=stops)
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if top_k is not None:
        request.top_k = top_k
    if seed is not None:
        request.seed = seed
    return request


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
    )


def chunk_from_proto(msg: lmserve_pb2.GenerateStreamResponse) -> StreamChunk:
    """A ``StreamChunk`` from a ``GenerateStreamResponse``; UNSPECIFIED reads as None,
    since the server leaves finish_reason unset on all but the last message."""
    reason = FinishReason.from_proto(msg.finish_reason)
    return StreamChunk(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=None if reason is FinishReason.UNSPECIFIED else reason,
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
    )
