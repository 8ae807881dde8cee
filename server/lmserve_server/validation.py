"""Turns a GenerateRequest message into an engine request, or an INVALID_ARGUMENT that
names the field and its limit."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lmserve.v1 import lmserve_pb2
from lmserve_server.engine.types import GenerationRequest, SamplingParams
from lmserve_server.errors import InvalidArgumentError


@dataclass(frozen=True)
class RequestLimits:
    max_context: int
    max_new_tokens_cap: int
    default_max_new_tokens: int
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    vocab_size: int = 50257
    max_prompt_chars: int = 100_000
    max_request_tokens: int = 0  # prompt + max_new_tokens the scheduler can hold; 0 = any
    request_tokens_flag: str = "--max-batch-tokens"  # the setting behind that limit


def build_generation_request(
    msg: lmserve_pb2.GenerateRequest,
    tokenize: Callable[[str], list[int]],
    limits: RequestLimits,
) -> GenerationRequest:
    if not msg.prompt:
        raise InvalidArgumentError("prompt: must not be empty")
    if len(msg.prompt) > limits.max_prompt_chars:
        raise InvalidArgumentError(
            f"prompt: {len(msg.prompt)} characters, at most {limits.max_prompt_chars} allowed "
            "(--max-prompt-chars)"
        )
    max_new_tokens = msg.max_new_tokens or limits.default_max_new_tokens
    if max_new_tokens > limits.max_new_tokens_cap:
        raise InvalidArgumentError(
            f"max_new_tokens: {max_new_tokens} exceeds the server's cap of "
            f"{limits.max_new_tokens_cap} (--max-new-tokens-cap)"
        )
    sampling = _sampling(msg, limits)
    stop = _stop_strings(msg, limits)
    prompt_ids = tokenize(msg.prompt)
    if not prompt_ids:
        raise InvalidArgumentError("prompt: tokenizes to no tokens")
    if len(prompt_ids) + max_new_tokens > limits.max_context:
        raise InvalidArgumentError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{len(prompt_ids) + max_new_tokens} exceeds the model's context of "
            f"{limits.max_context} tokens"
        )
    total = len(prompt_ids) + max_new_tokens
    if limits.max_request_tokens and total > limits.max_request_tokens:
        raise InvalidArgumentError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the server's limit of {limits.max_request_tokens} tokens per request "
            f"({limits.request_tokens_flag})"
        )
    return GenerationRequest(
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=stop,
    )


def _sampling(msg: lmserve_pb2.GenerateRequest, limits: RequestLimits) -> SamplingParams:
    temperature = msg.temperature if msg.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(f"temperature: {temperature} must be >= 0 (0 means greedy)")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidArgumentError(f"top_p: {top_p} must be in (0, 1]")
    top_k = msg.top_k if msg.HasField("top_k") else 0
    if top_k > limits.vocab_size:
        raise InvalidArgumentError(
            f"top_k: {top_k} exceeds the vocabulary size {limits.vocab_size} (0 means no limit)"
        )
    seed = msg.seed if msg.HasField("seed") else None
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def _stop_strings(msg: lmserve_pb2.GenerateRequest, limits: RequestLimits) -> tuple[str, ...]:
    if len(msg.stop) > limits.max_stop_strings:
        raise InvalidArgumentError(
            f"stop: {len(msg.stop)} strings, at most {limits.max_stop_strings} allowed"
        )
    for s in msg.stop:
        if not s:
            raise InvalidArgumentError("stop: strings must not be empty")
        if len(s) > limits.max_stop_chars:
            raise InvalidArgumentError(
                f"stop: a string of {len(s)} characters, at most {limits.max_stop_chars} allowed"
            )
    return tuple(msg.stop)
