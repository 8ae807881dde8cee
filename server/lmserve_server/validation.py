"""Turns a GenerateRequest message into an engine request, or an INVALID_ARGUMENT that
names the field and its limit. ``grammar_spec`` reads its structured_output (compiled by the
service afterwards, ``grammar.compiler``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.v1 import lmserve_pb2
from lmserve_server.engine.types import GenerationRequest, SamplingParams
from lmserve_server.errors import InvalidArgumentError
from lmserve_server.grammar.spec import GrammarKind, GrammarSpec
from lmserve_server.limits import MAX_LOGPROBS, RequestTokenLimit

if TYPE_CHECKING:
    from lmserve_server.chat import RenderedChat

# Renders a request's messages ((role, content) pairs) into prompt text (``chat.py``).
RenderChat = Callable[[Sequence[tuple[str, str]]], "RenderedChat"]
# The structured_output formats given as text.
_TEXT_KINDS: dict[str, GrammarKind] = {
    "json_schema": "json_schema",
    "regex": "regex",
    "grammar": "grammar",
}


@dataclass(frozen=True)
class RequestLimits:
    max_context: int
    max_new_tokens_cap: int
    default_max_new_tokens: int
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    vocab_size: int = 50257
    max_prompt_chars: int = 100_000
    # What the scheduler can hold (prompt + max_new_tokens); the default: any length.
    request_tokens: RequestTokenLimit = field(default_factory=RequestTokenLimit)
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300  # entries, as OpenAI allows
    max_cache_salt_chars: int = 256


def build_generation_request(
    msg: lmserve_pb2.GenerateRequest,
    tokenize: Callable[[str], list[int]],
    limits: RequestLimits,
    render_chat: RenderChat | None = None,
) -> GenerationRequest:
    """The engine request of ``msg``; ``render_chat`` turns its messages into prompt text
    (rendered last, after every cheaper check)."""
    given = [
        name
        for name, present in (
            ("prompt", bool(msg.prompt)),
            ("prompt_token_ids", bool(msg.prompt_token_ids)),
            ("messages", bool(msg.messages)),
        )
        if present
    ]
    if len(given) > 1:
        raise InvalidArgumentError(
            f"{', '.join(given)}: set exactly one of prompt, prompt_token_ids and messages"
        )
    if not given:
        raise InvalidArgumentError(
            "prompt: must not be empty (or give prompt_token_ids or messages)"
        )
    if len(msg.prompt) > limits.max_prompt_chars:
        raise InvalidArgumentError(
            f"prompt: {len(msg.prompt)} characters, at most {limits.max_prompt_chars} allowed "
            "(--max-prompt-chars)"
        )
    if len(msg.prompt_token_ids) > limits.max_context:
        raise InvalidArgumentError(
            f"prompt_token_ids: {len(msg.prompt_token_ids)} tokens, more than the model's "
            f"context of {limits.max_context}"
        )
    _token_ids("prompt_token_ids", msg.prompt_token_ids, limits)
    max_new_tokens = msg.max_new_tokens or limits.default_max_new_tokens
    if max_new_tokens > limits.max_new_tokens_cap:
        raise InvalidArgumentError(
            f"max_new_tokens: {max_new_tokens} exceeds the server's cap of "
            f"{limits.max_new_tokens_cap} (--max-new-tokens-cap)"
        )
    sampling = _sampling(msg, limits)
    stop = _stop_strings(msg, limits)
    if len(msg.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgumentError(
            f"stop_token_ids: {len(msg.stop_token_ids)} ids, at most "
            f"{limits.max_stop_token_ids} allowed"
        )
    _token_ids("stop_token_ids", msg.stop_token_ids, limits)
    min_new_tokens = msg.min_new_tokens if msg.HasField("min_new_tokens") else 0
    if min_new_tokens > max_new_tokens:
        raise InvalidArgumentError(
            f"min_new_tokens: {min_new_tokens} exceeds max_new_tokens ({max_new_tokens})"
        )
    logprobs = msg.logprobs if msg.HasField("logprobs") else None
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise InvalidArgumentError(f"logprobs: {logprobs} must be in [0, {MAX_LOGPROBS}]")
    if len(msg.cache_salt) > limits.max_cache_salt_chars:
        raise InvalidArgumentError(
            f"cache_salt: {len(msg.cache_salt)} characters, at most "
            f"{limits.max_cache_salt_chars} allowed"
        )
    _messages(msg, limits)
    if msg.messages:
        if render_chat is None:
            raise InvalidArgumentError("messages: this server does not render chat messages")
        rendered = render_chat([(m.role, m.content) for m in msg.messages])
        text = rendered.text
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgumentError(
                f"messages: rendered with the chat template, {len(text)} characters, at most "
                f"{limits.max_prompt_chars} allowed (--max-prompt-chars)"
            )
        prompt_ids = rendered.token_ids if rendered.token_ids is not None else tokenize(text)
    else:
        prompt_ids = list(msg.prompt_token_ids) or tokenize(msg.prompt)
    if not prompt_ids:
        raise InvalidArgumentError(f"{given[0]}: tokenizes to no tokens")
    if len(prompt_ids) + max_new_tokens > limits.max_context:
        raise InvalidArgumentError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{len(prompt_ids) + max_new_tokens} exceeds the model's context of "
            f"{limits.max_context} tokens"
        )
    limits.request_tokens.check(len(prompt_ids), max_new_tokens)
    return GenerationRequest(
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=stop,
        stop_token_ids=tuple(msg.stop_token_ids),
        min_new_tokens=min_new_tokens,
        logprobs=logprobs,
        cache_salt=msg.cache_salt,
    )


def _messages(msg: lmserve_pb2.GenerateRequest, limits: RequestLimits) -> None:
    chars = sum(len(m.role) + len(m.content) for m in msg.messages)
    if chars > limits.max_prompt_chars:
        raise InvalidArgumentError(
            f"messages: {chars} characters, at most {limits.max_prompt_chars} allowed "
            "(--max-prompt-chars)"
        )
    for i, m in enumerate(msg.messages):
        if not m.role:
            raise InvalidArgumentError(f"messages[{i}].role: must not be empty")


def grammar_spec(msg: lmserve_pb2.GenerateRequest, limits: RequestLimits) -> GrammarSpec | None:
    """What ``msg.structured_output`` asks for, checked for shape and size (whether it
    compiles is the compiler's to say); None when it is unset."""
    if not msg.HasField("structured_output"):
        return None
    output = msg.structured_output
    kind = output.WhichOneof("format")
    if kind is None:
        raise InvalidArgumentError(
            "structured_output: set one of json_schema, json_object, regex, choice, grammar "
            "(or leave structured_output unset for free text)"
        )
    if kind == "json_object":
        if not output.json_object:
            raise InvalidArgumentError(
                "structured_output.json_object: false asks for nothing; leave "
                "structured_output unset for free text"
            )
        return GrammarSpec("json_object")
    if kind == "choice":
        options = list(output.choice.options)
        field = "structured_output.choice.options"
        if not options:
            raise InvalidArgumentError(f"{field}: must not be empty")
        if not all(options):
            raise InvalidArgumentError(f"{field}: an option must not be empty")
        _grammar_size(field, sum(map(len, options)), limits)
        return GrammarSpec.choice(options)
    text: str = getattr(output, kind)
    field = f"structured_output.{kind}"
    if not text.strip():
        raise InvalidArgumentError(f"{field}: must not be empty")
    _grammar_size(field, len(text), limits)
    return GrammarSpec(_TEXT_KINDS[kind], text)


def _grammar_size(field: str, chars: int, limits: RequestLimits) -> None:
    if chars > limits.max_prompt_chars:
        raise InvalidArgumentError(
            f"{field}: {chars} characters, at most {limits.max_prompt_chars} allowed "
            "(--max-prompt-chars)"
        )


def _token_ids(field: str, ids: Sequence[int], limits: RequestLimits) -> None:
    bad = [t for t in ids if t >= limits.vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"{field}: {bad[0]} is not a token id of the model (vocabulary of "
            f"{limits.vocab_size}: 0 to {limits.vocab_size - 1})"
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
    min_p = msg.min_p if msg.HasField("min_p") else 0.0
    if not (0.0 <= min_p <= 1.0):
        raise InvalidArgumentError(f"min_p: {min_p} must be in [0, 1] (0 means no limit)")
    seed = msg.seed if msg.HasField("seed") else None
    repetition = msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0
    if not math.isfinite(repetition) or repetition <= 0:
        raise InvalidArgumentError(
            f"repetition_penalty: {repetition} must be > 0 (1 changes nothing)"
        )
    presence = _in_range("presence_penalty", msg, -2.0, 2.0, 0.0)
    frequency = _in_range("frequency_penalty", msg, -2.0, 2.0, 0.0)
    if len(msg.logit_bias) > limits.max_logit_bias:
        raise InvalidArgumentError(
            f"logit_bias: {len(msg.logit_bias)} entries, at most {limits.max_logit_bias} allowed"
        )
    _token_ids("logit_bias", sorted(msg.logit_bias), limits)
    for token, bias in msg.logit_bias.items():
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            raise InvalidArgumentError(
                f"logit_bias: {bias} for token {token} must be in [-100, 100]"
            )
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
    )


def _in_range(
    field: str, msg: lmserve_pb2.GenerateRequest, low: float, high: float, default: float
) -> float:
    value: float = getattr(msg, field) if msg.HasField(field) else default
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgumentError(f"{field}: {value} must be in [{low:g}, {high:g}]")
    return value


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
