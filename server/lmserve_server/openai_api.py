"""The OpenAI API's request and response bodies, and their translation to and from lmserve's
own: a completion or chat request becomes one ``GenerateRequest`` message per choice, which
the same validation as gRPC's checks (``validation.py``, through ``Frontend.build``); what
the engine returns becomes OpenAI's JSON.

Nothing here decides whether a value is in range: that is the validation's, so both APIs
refuse the same requests with the same words (``param_of`` names the OpenAI field an error
is about). This module refuses only what has no lmserve meaning (``echo``, ``suffix``,
``tools``, ...) or does not fit the protobuf field it maps to (a negative count).

Where OpenAI and vLLM differ from lmserve's defaults, the OpenAI API's hold: an unset
``temperature`` is 1 (sampling), not greedy; choice ``i`` of ``n`` with a ``seed`` samples
with ``seed + i`` (as vLLM does), so the choices differ and each is reproducible. An unset
``max_tokens`` is the server's ``--default-max-new-tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmserve.v1 import lmserve_pb2
from lmserve_server.engine.types import FinishReason, TokenLogprob
from lmserve_server.errors import InvalidArgumentError

# What OpenAI's API samples with when the request does not say.
DEFAULT_TEMPERATURE = 1.0

# The engine's finish reasons as OpenAI names them: an end-of-sequence token, a stop string
# and a stop token all "stop".
FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
}

# The GenerateRequest fields a validation message may start with, and the OpenAI field a
# caller set to give it (the chat API's names where they differ: see ``param_of``).
_PARAMS = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "prompt_token_ids": "prompt",
    "cache_salt": "cache_salt",
}
_CHAT_PARAMS = {"logprobs": "top_logprobs", "max_new_tokens": "max_completion_tokens"}


class _Request(BaseModel):
    # strict: a string is not a number, nor 1 a boolean; unknown fields are ignored, as
    # OpenAI-compatible servers do, so that a newer SDK's additions don't break a call.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str | None = None
    # "schema" would shadow a BaseModel attribute.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (the newer name of its ``guided_*`` fields)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request (OpenAI takes a list of them, each its own choices)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if not prompt:
            raise InvalidArgumentError("prompt: must not be empty")
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidArgumentError(
                    f"messages[{index}].content: a part of type {part.type!r}; this server "
                    "reads text parts only"
                )
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


def parse(model: type[_Request], body: bytes) -> Any:
    """``body`` as ``model``; InvalidArgumentError saying what is wrong where."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise InvalidArgumentError(_describe(err)) from None


def _describe(err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    where = _where(first["loc"])
    if first["type"] == "missing":
        return f"{where}: required"
    if sum(_where(e["loc"]) == where for e in errors) > 1:  # each member of a union refused
        return f"{where}: not a value of a type it takes"
    return f"{where}: {first['msg'][:1].lower()}{first['msg'][1:]}"


def _where(loc: tuple[int | str, ...]) -> str:
    """A field's path (``messages[0].content``), up to the member of a union that pydantic
    names next (``str``, ``list[int]``, a model's class name)."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in _TYPE_TAGS or not part.isidentifier() or part[:1].isupper():
            break
        else:
            where += f".{part}" if where else part
    return where or "request body"


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def param_of(message: str, chat: bool) -> str | None:
    """The OpenAI field a validation message (``field: what is wrong``) is about."""
    field, colon, _ = message.partition(":")
    if not colon or " " in field:
        return None
    field = field.split(".")[0].split("[")[0]
    if field == "structured_output":
        return "response_format"
    if chat and field in _CHAT_PARAMS:
        return _CHAT_PARAMS[field]
    return _PARAMS.get(field, field)


def check_choices(request: _Request, prompts: int, max_choices: int) -> None:
    if request.n < 1:
        raise InvalidArgumentError(f"n: {request.n} must be at least 1")
    if request.n * prompts > max_choices:
        what = f"{request.n} choices" if prompts == 1 else f"{prompts} prompts x {request.n}"
        raise InvalidArgumentError(
            f"n: {what}, at most {max_choices} per request (--max-batch-size: a request's "
            "choices run together)"
        )
    if request.stream_options is not None and not request.stream:
        raise InvalidArgumentError("stream_options: only with stream: true")


def completion_messages(request: CompletionRequest) -> list[lmserve_pb2.GenerateRequest]:
    """A GenerateRequest per prompt of ``request`` (each its first choice's: the others
    differ in their seeds alone)."""
    if request.echo:
        raise InvalidArgumentError("echo: not supported (the prompt is not sent back)")
    if request.suffix:
        raise InvalidArgumentError("suffix: not supported (no fill-in-the-middle)")
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidArgumentError("best_of: not supported (every choice is sent back)")
    common = _common(request, request.max_tokens, "max_tokens")
    if request.logprobs is not None:
        _set_count(common, "logprobs", request.logprobs, "logprobs")
    per_prompt = []
    for prompt in request.prompts():
        message = lmserve_pb2.GenerateRequest()
        message.CopyFrom(common)
        if isinstance(prompt, str):
            message.prompt = prompt
        else:
            for token in prompt:
                if token < 0:
                    raise InvalidArgumentError(f"prompt: {token} is not a token id")
            message.prompt_token_ids.extend(prompt)
        per_prompt.append(message)
    return per_prompt


def chat_message(request: ChatCompletionRequest) -> lmserve_pb2.GenerateRequest:
    """The GenerateRequest of ``request`` (its first choice's: the others differ in their
    seeds alone)."""
    if request.tools or request.functions:
        raise InvalidArgumentError("tools: not supported (no tool calling)")
    if request.max_completion_tokens is not None:
        message = _common(request, request.max_completion_tokens, "max_completion_tokens")
    else:
        message = _common(request, request.max_tokens, "max_tokens")
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidArgumentError("top_logprobs: only with logprobs: true")
    if request.logprobs:
        _set_count(message, "logprobs", request.top_logprobs or 0, "top_logprobs")
    if not request.messages:
        raise InvalidArgumentError("messages: must not be empty")
    message.messages.extend(
        lmserve_pb2.ChatMessage(role=m.role, content=m.text(i))
        for i, m in enumerate(request.messages)
    )
    return message


def _common(
    request: _Request, max_tokens: int | None, max_field: str
) -> lmserve_pb2.GenerateRequest:
    message = lmserve_pb2.GenerateRequest()
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidArgumentError(f"{max_field}: {max_tokens} must be at least 1")
        _set_count(message, "max_new_tokens", max_tokens, max_field)
    message.temperature = (
        DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    )
    for name in ("top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            setattr(message, name, value)
    if request.top_k is not None and request.top_k not in (0, -1):  # vLLM's -1: no limit
        _set_count(message, "top_k", request.top_k, "top_k")
    if request.min_tokens is not None:
        _set_count(message, "min_new_tokens", request.min_tokens, "min_tokens")
    if request.ignore_eos:  # vLLM's: every token up to the limit (load tools send it)
        if max_tokens is None:
            raise InvalidArgumentError(f"ignore_eos: needs {max_field}")
        message.min_new_tokens = message.max_new_tokens
    if request.seed is not None:
        _set_count(message, "seed", request.seed, "seed")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    message.stop.extend(stop)
    for token in request.stop_token_ids or ():
        if token < 0:
            raise InvalidArgumentError(f"stop_token_ids: {token} is not a token id")
    message.stop_token_ids.extend(request.stop_token_ids or ())
    for key, bias in (request.logit_bias or {}).items():
        if not key.isdigit():
            raise InvalidArgumentError(f"logit_bias: {key!r} is not a token id")
        message.logit_bias[int(key)] = bias
    salt = request.cache_salt if request.cache_salt is not None else request.user
    message.cache_salt = salt or ""
    _structured_output(request, message.structured_output)
    if not any(message.structured_output.ListFields()):
        message.ClearField("structured_output")
    return message


def _set_count(message: lmserve_pb2.GenerateRequest, name: str, value: int, field: str) -> None:
    if not 0 <= value < 2**64:
        raise InvalidArgumentError(f"{field}: {value} must be a whole number >= 0")
    setattr(message, name, value)


def _structured_output(request: _Request, output: lmserve_pb2.StructuredOutput) -> None:
    """The one format asked for, by response_format, the guided_* fields or
    structured_outputs; more than one is refused."""
    given: list[tuple[str, Callable[[], None]]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", lambda: setattr(output, "json_object", True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise InvalidArgumentError("response_format.json_schema.schema: required")
        schema = json.dumps(fmt.json_schema.json_schema)
        given.append(("response_format", lambda: setattr(output, "json_schema", schema)))
    guided = request.structured_outputs
    sources: list[tuple[str, str | dict[str, Any] | list[str] | bool | None, str]] = [
        ("guided_json", request.guided_json, "json_schema"),
        ("guided_regex", request.guided_regex, "regex"),
        ("guided_choice", request.guided_choice, "choice"),
        ("guided_grammar", request.guided_grammar, "grammar"),
    ]
    if guided is not None:
        sources += [
            ("structured_outputs.json", guided.json_, "json_schema"),
            ("structured_outputs.regex", guided.regex, "regex"),
            ("structured_outputs.choice", guided.choice, "choice"),
            ("structured_outputs.grammar", guided.grammar, "grammar"),
            ("structured_outputs.json_object", guided.json_object or None, "json_object"),
        ]
    for name, value, kind in sources:
        if value is not None:
            given.append((name, _setter(output, kind, value)))
    if len(given) > 1:
        raise InvalidArgumentError(
            f"{', '.join(name for name, _ in given)}: set at most one output format"
        )
    for _, apply in given:
        apply()


def _setter(output: lmserve_pb2.StructuredOutput, kind: str, value: Any) -> Callable[[], None]:
    def apply() -> None:
        if kind == "choice":
            output.choice.options.extend(value)
        elif kind == "json_object":
            output.json_object = True
        elif kind == "json_schema" and not isinstance(value, str):
            output.json_schema = json.dumps(value)
        else:
            setattr(output, kind, value)

    return apply


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


TokenText = Callable[[int], str]


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """The completions API's logprobs object (tokens, their logprobs, the top alternatives
    and each token's character offset in the choice's text, from ``offset``)."""
    tokens = [token_text(lp.token_id) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(logprobs: Iterable[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """The chat API's logprobs object: per token its text, logprob, bytes and alternatives."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ],
        "refusal": None,
    }
