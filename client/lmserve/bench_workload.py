"""What ``lmserve-client bench`` sends, and when: workloads and the Poisson arrival schedule.

A workload maps a request index to a ``RequestSpec`` (prompt and ``max_new_tokens``), the
same spec for the same index whatever the order requests complete in, so two runs (or two
servers compared side by side) get the same requests. Three kinds: one fixed prompt, a
prompts file (plain text, one prompt a line; or JSONL with a per-request
``max_new_tokens``), and a seeded mixed workload whose prompt lengths and
``max_new_tokens`` are drawn from given ranges. No tokenizer is needed on the client: the
mixed prompts are made of words that are one token each under the GPT-2 tokenizer, so a
prompt of N words is N tokens for GPT-2 models (and about that for others).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve.structured import ChatMessage, chat_message
from lmserve.structured import from_json as structured_output_from_json
from lmserve.types import GenerateOptions

# Common English words, each a single GPT-2 token with its leading space (checked against
# the GPT-2 tokenizer in tests/test_bench.py).
_WORDS_TEXT = """
    the of and to in is was for on that with as by at from his her their they this it be are
    were have has had not but or an which one all would there what so up out if about who
    get when make can like time just him know take people into year your good some could
    them see other than then now look only come its over think also back after use two how
    our work first well way even new want because any these give day most us man world life
    hand part child eye woman place week case point government company number group problem
    fact old great little own long small large next early young important few public bad
    same able last late high different city house water light night story money book word
    river music game team market mind body table door road garden window morning letter
    friend mother father family school field paper ship train horse bird tree stone fire
    wind rain snow summer winter sea island mountain forest village street bridge kitchen
    dinner bread cheese coffee sugar salt apple orange green blue red black white yellow
    brown quiet happy strong open close walk read write speak sing dance sleep build carry
    bring start finish learn teach watch listen travel visit quickly slowly often always
    never again together almost already perhaps maybe nothing something everything someone
    nobody anyone history science language picture dream voice heart power reason moment
    answer question idea plan song journey
"""
WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload. ``max_new_tokens`` 0 means the server's default; the
    prompt is text, token ids or chat messages; ``options`` are more ``GenerateOptions`` (a
    JSONL line's)."""

    prompt: str | tuple[int, ...] | tuple[ChatMessage, ...]
    max_new_tokens: int
    options: tuple[tuple[str, Any], ...] = ()

    def generate_options(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, **dict(self.options)}


class Workload:
    """Request ``i`` of a run is ``spec(i)``; ``describe()`` says what the workload is."""

    def spec(self, index: int) -> RequestSpec:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class FixedWorkload(Workload):
    """The same prompt and ``max_new_tokens`` for every request."""

    def __init__(self, prompt: str, max_new_tokens: int) -> None:
        if not prompt:
            raise ValueError("the prompt must not be empty")
        self._spec = RequestSpec(prompt, max_new_tokens)

    def spec(self, index: int) -> RequestSpec:
        return self._spec

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "fixed",
            "prompt": self._spec.prompt,
            "max_new_tokens": self._spec.max_new_tokens,
        }


class ChatWorkload(Workload):
    """Another workload's text prompts, each sent as one user message: the server renders it
    with the model's chat template, so an instruct model answers it and ends its turn (token
    ids and chat prompts are sent as they are)."""

    def __init__(self, inner: Workload) -> None:
        self._inner = inner

    def spec(self, index: int) -> RequestSpec:
        spec = self._inner.spec(index)
        if not isinstance(spec.prompt, str):
            return spec
        return RequestSpec((ChatMessage("user", spec.prompt),), spec.max_new_tokens, spec.options)

    def describe(self) -> dict[str, Any]:
        return {**self._inner.describe(), "chat": True}


class ListWorkload(Workload):
    """Requests taken in turn from a list (cycled when the run asks for more)."""

    def __init__(self, specs: Sequence[RequestSpec], *, source: str = "list") -> None:
        if not specs:
            raise ValueError(f"{source}: no prompts")
        self.specs = list(specs)
        self._source = source

    def spec(self, index: int) -> RequestSpec:
        return self.specs[index % len(self.specs)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "file", "path": self._source, "prompts": len(self.specs)}


def load_prompts_file(path: str | Path, default_max_new_tokens: int) -> ListWorkload:
    """A workload from ``path``: JSONL when it ends in ``.jsonl``/``.ndjson`` (objects with
    ``prompt``, ``prompt_token_ids`` or ``messages``, optionally ``max_new_tokens`` and any
    other ``GenerateOptions``: ``{"prompt": "Hi", "logprobs": 5, "logit_bias": {"50256":
    -100}}``, ``{"messages": [{"role": "user", "content": "Hi"}], "structured_output":
    {"choice": ["yes", "no"]}}``), else one prompt per non-empty line."""
    file = Path(path)
    lines = file.read_text(encoding="utf-8").splitlines()
    specs: list[RequestSpec] = []
    is_jsonl = file.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            specs.append(RequestSpec(line, default_max_new_tokens))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: not JSON: {err.msg}") from None
        try:
            specs.append(_spec_of(obj, default_max_new_tokens))
        except ValueError as err:
            raise ValueError(f"{file}:{number}: {err}") from None
    return ListWorkload(specs, source=str(file))


def _spec_of(obj: Any, default_max_new_tokens: int) -> RequestSpec:
    """A JSONL line's request; the server checks the options' values."""
    if not isinstance(obj, dict):
        raise ValueError("expected an object with a 'prompt', 'prompt_token_ids' or 'messages'")
    fields = dict(obj)
    prompt: str | tuple[int, ...] | tuple[ChatMessage, ...] | None = fields.pop("prompt", None)
    ids = fields.pop("prompt_token_ids", None)
    if ids is not None:
        if prompt is not None or not _int_list(ids):
            raise ValueError("'prompt_token_ids' must be a list of token ids, without 'prompt'")
        prompt = tuple(ids)
    messages = fields.pop("messages", None)
    if messages is not None:
        if prompt is not None or not isinstance(messages, list) or not messages:
            raise ValueError(
                "'messages' must be a non-empty list of chat messages, without 'prompt' or "
                "'prompt_token_ids'"
            )
        if not all(isinstance(m, dict) for m in messages):
            raise ValueError("a chat message is {'role': str, 'content': str}")
        prompt = tuple(chat_message(m) for m in messages)
    if not prompt or not isinstance(prompt, (str, tuple)):
        raise ValueError(
            "expected an object with a non-empty 'prompt', 'prompt_token_ids' or 'messages'"
        )
    tokens = fields.pop("max_new_tokens", default_max_new_tokens)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError("max_new_tokens must be a non-negative integer")
    unknown = set(fields) - set(GenerateOptions.__annotations__)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if isinstance(fields.get("logit_bias"), dict):  # JSON object keys are strings
        try:
            fields["logit_bias"] = {int(k): float(v) for k, v in fields["logit_bias"].items()}
        except (TypeError, ValueError):
            raise ValueError("logit_bias must map token ids to numbers") from None
    if "structured_output" in fields:
        fields["structured_output"] = structured_output_from_json(fields["structured_output"])
    for name in ("stop", "stop_token_ids"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return RequestSpec(prompt, tokens, tuple(sorted(fields.items())))


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


class MixedWorkload(Workload):
    """Prompt lengths (in words, one GPT-2 token each) and ``max_new_tokens`` drawn
    uniformly from inclusive ranges, seeded per request index (reproducible, order-free)."""

    def __init__(
        self, prompt_tokens: tuple[int, int], new_tokens: tuple[int, int], seed: int = 0
    ) -> None:
        for name, (low, high) in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
            if not 1 <= low <= high:
                raise ValueError(f"{name}: need 1 <= low <= high, got {low}:{high}")
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.seed = seed

    def spec(self, index: int) -> RequestSpec:
        # A generator per index, not one shared stream: spec(i) must not depend on which
        # requests were asked for before it.
        rng = random.Random(f"{self.seed}:{index}")
        length = rng.randint(*self.prompt_tokens)
        prompt = "".join(" " + rng.choice(WORDS) for _ in range(length))
        return RequestSpec(prompt, rng.randint(*self.new_tokens))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "mixed",
            "prompt_tokens": list(self.prompt_tokens),
            "max_new_tokens": list(self.new_tokens),
            "seed": self.seed,
        }


def prompt_of_length(tokens: int, seed: int = 0) -> str:
    """A prompt of ``tokens`` words (``tokens`` GPT-2 tokens), the same for the same seed."""
    rng = random.Random(f"prompt:{seed}")
    return "".join(" " + rng.choice(WORDS) for _ in range(tokens))


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival times (seconds from the start) of a Poisson process of ``rate`` per second:
    independent exponential gaps of mean ``1 / rate``. The first arrival is at 0, so a run
    starts at once rather than after a random delay."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)
