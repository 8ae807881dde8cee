"""``GrammarSpec``: what a request's ``structured_output`` asks for, before compiling.

Plain data, no library: validation builds it from the protobuf message, the compiler keys its
cache on ``key`` and names ``field`` in its errors, so a caller reads which part of its
request was refused (``structured_output.json_schema: ...``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[GrammarKind, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint. ``text`` is the JSON Schema document (json_schema), the regex, the
    Lark grammar (grammar), the options as a JSON list (choice), or empty (json_object)."""

    kind: GrammarKind
    text: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What the compile cache is keyed by: equal specs compile to the same grammar."""
        return (self.kind, self.text)

    @property
    def field(self) -> str:
        """The request field that carried it, as errors name it."""
        if self.kind == "choice":
            return "structured_output.choice.options"
        return f"structured_output.{self.kind}"

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(options, ensure_ascii=False))

    @property
    def options(self) -> list[str]:
        """A choice's options."""
        if self.kind != "choice":
            raise ValueError(f"a {self.kind} spec has no options")
        options: list[str] = json.loads(self.text)
        return options
