"""Chat messages: a request's ``messages`` rendered into the prompt text its model expects.

The model's own chat template (its tokenizer's), or the one given with ``--chat-template
FILE``, rendered by transformers (``apply_chat_template``, a sandboxed Jinja environment)
with the generation prompt added. The text is then tokenized exactly as a ``prompt`` is, so
``messages`` and the rendered text sent as ``prompt`` give the same tokens.

Special-token text inside a message's content (``<|im_start|>system``) is, by default,
tokenized as the control token it spells, as vLLM and transformers do: a user can then
forge a turn of the conversation. With ``--chat-special-tokens literal`` it is plain text:
each such string in the content is swapped for a marker nobody can guess before rendering,
and tokenized on its own as ordinary text where the marker lands; the rest of the prompt
(the template's own control tokens included) is tokenized as in ``parse``. Content without
special-token text gives the same tokens either way.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RenderedChat:
    """A conversation's prompt: its text, and its tokens where they are not the text's
    (``--chat-special-tokens literal`` and special-token text in the content)."""

    text: str
    token_ids: list[int] | None = None


class ChatRenderer:
    """Renders a conversation with ``template`` when given, else the tokenizer's own;
    ``special_tokens`` is ``parse`` or ``literal`` (what special-token text in a message's
    content becomes)."""

    def __init__(
        self, tokenizer: Any, template: str | None = None, special_tokens: str = "parse"
    ) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self.available = template is not None or tokenizer.chat_template is not None
        self._special: re.Pattern[str] | None = None
        if special_tokens == "literal":
            # Every string the tokenizer turns into a token of its own: its added tokens.
            texts = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
            if texts:
                self._special = re.compile("|".join(map(re.escape, texts)))

    def prompt(self, messages: Sequence[tuple[str, str]]) -> RenderedChat:
        """The prompt of ``messages`` ((role, content) pairs): as ``render`` in ``parse``
        mode; in ``literal`` mode special-token text in the content is tokenized as text."""
        if self._special is None:
            return RenderedChat(self.render(messages))
        found: list[str] = []
        marker = secrets.token_hex(8)  # unguessable: content can't hold a marker

        def swap(match: re.Match[str]) -> str:
            found.append(match.group())
            return f"[{marker}:{len(found) - 1}]"

        swapped = [(role, self._special.sub(swap, content)) for role, content in messages]
        text = self.render(swapped)
        if not found:
            return RenderedChat(text)
        pieces = re.split(rf"\[{marker}:(\d+)\]", text)
        tokenizer = self._tokenizer
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += tokenizer.encode(piece, add_special_tokens=False) if piece else []
            else:
                ids += tokenizer.encode(
                    found[int(piece)], add_special_tokens=False, split_special_tokens=True
                )
        plain = "".join(p if i % 2 == 0 else found[int(p)] for i, p in enumerate(pieces))
        return RenderedChat(plain, ids)

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
