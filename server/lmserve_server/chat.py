"""Chat messages: a request's ``messages`` rendered into the prompt text its model expects.

The model's own chat template (its tokenizer's), or the one given with ``--chat-template
FILE``, rendered by transformers (``apply_chat_template``, a sandboxed Jinja environment)
with the generation prompt added. The text is then tokenized exactly as a ``prompt`` is, so
``messages`` and the rendered text sent as ``prompt`` give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from lmserve_server.errors import InvalidArgumentError

# The most characters of an operator's template file: real ones are a few kB.
MAX_TEMPLATE_BYTES = 1 << 20


def read_chat_template(path: str) -> str:
    """The template in ``path``, syntax-checked; ``ValueError`` (one line, naming the flag)
    when it can't be read or is not a Jinja template, so the daemon refuses to start."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"--chat-template {path}: cannot read it: {err.strerror}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise ValueError(f"--chat-template {path}: {len(data)} bytes, more than a template")
    try:
        text = data.decode("utf-8")
        # The environment transformers renders templates in: the same syntax and extensions.
        jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(
            text
        )
    except UnicodeDecodeError:
        raise ValueError(f"--chat-template {path}: not UTF-8 text") from None
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(
            f"--chat-template {path}: not a Jinja template: line {err.lineno}: {err.message}"
        ) from None
    return text


class ChatRenderer:
    """Renders a conversation with ``template`` when given, else the tokenizer's own."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self.available = template is not None or tokenizer.chat_template is not None

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt text of ``messages`` ((role, content) pairs), the generation prompt
        added; INVALID_ARGUMENT when there is no template or it refuses them (a template
        may, e.g., require alternating roles)."""
        if not self.available:
            raise InvalidArgumentError(
                "messages: the served model has no chat template (start the server with "
                "--chat-template FILE, or send the rendered text as prompt)"
            )
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                conversation,
                chat_template=self._template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except (jinja2.TemplateError, ValueError, TypeError) as err:
            detail = " ".join(str(err).split())[:300]
            raise InvalidArgumentError(
                f"messages: the chat template refused them: {detail}"
            ) from None
        return str(text)
