"""The grammar library, llguidance, behind two calls: ``build_index`` (once per tokenizer)
and ``compile_template`` (once per spec). Nothing else in lmserve imports it.

Why llguidance (measured with ``benchmarks/grammar_libs.py``, figures in BENCHMARKS.md):
every compile it does is bounded by its fuel limits (a 40-character ``pattern`` that kept
xgrammar's compiler busy for 9 s compiles here in 2 ms, and no input can run unbounded in a
thread we can't cancel); it refuses a JSON Schema keyword it can't enforce (``uniqueItems``)
where xgrammar silently ignores it, so what ends by its grammar validates; it has no
dependencies (xgrammar pulls triton, ~1 GB); its mask fills (~15 us a row) are well inside a
step's budget.

A spec compiles to a *template* matcher: the grammar parsed, and its first mask computed once
(llguidance builds its lexer lazily, so that work is done here, on the compile threads, and
not in a row's first step). Rows get deep copies of the template.

JSON is compact: no whitespace between tokens, ``,`` and ``:`` separators, so a bounded
schema gives bounded output.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from copy import copy
from dataclasses import dataclass
from typing import Any

import llguidance

from lmserve_server.grammar.spec import GrammarSpec

# No insignificant whitespace; the separators' defaults are "," and ":".
_COMPACT_JSON: Any = {"whitespace_flexible": False}
# The matchers report their errors through get_error(), never on stderr.
_SILENT = 0
_ANY_OBJECT = '{"type": "object"}'
# The library's own bounds on a grammar's work, its defaults but for its errors: without the
# parser's state and the grammar quoted (a client's schema echoed back, kilobytes of it).
_LIMITS = {"verbose_errors": False}
# A reason sent back to a client: enough to act on, never the whole schema.
MAX_REASON_CHARS = 300


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**_LIMITS)


class GrammarError(ValueError):
    """The spec is not a grammar the library can compile; the message is one line."""


class GrammarUnavailableError(RuntimeError):
    """Structured output can't be served for this tokenizer (the message says why)."""


@dataclass(frozen=True)
class TokenizerIndex:
    """The library's view of the served tokenizer: which bytes each token stands for, and
    the end tokens a complete grammar allows. ``vocab_size`` is the masks' width in tokens:
    the model's vocabulary or the tokenizer's, whichever is larger (a model may pad its
    embeddings past its tokenizer; those tokens are never allowed). ``tokenizer_json`` is
    what it was built from, so a child process (``probe``) builds the same one."""

    tokenizer: llguidance.LLTokenizer
    vocab_size: int
    end_token_ids: tuple[int, ...]
    tokenizer_json: str


def index_from_json(
    tokenizer_json: str, vocab_size: int, end_token_ids: Collection[int]
) -> TokenizerIndex:
    """The index of a tokenizer given as its ``tokenizers`` JSON (no transformers needed)."""
    ends = sorted(end_token_ids)
    tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=ends)
    return TokenizerIndex(tokenizer, vocab_size, tuple(ends), tokenizer_json)


def build_index(
    hf_tokenizer: Any, model_vocab_size: int, end_token_ids: Collection[int]
) -> TokenizerIndex:
    """The index of ``hf_tokenizer`` (a fast Hugging Face tokenizer): a few hundred
    milliseconds for a 50k vocabulary, so the daemon builds it once, off the event loop."""
    try:
        vocab_size = max(model_vocab_size, len(hf_tokenizer))
        # As llguidance.hf.from_tokenizer does: the Rust tokenizer as JSON, with the added
        # tokens, without padding or truncation.
        backend = copy(hf_tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        return index_from_json(backend.to_str(), vocab_size, end_token_ids)
    except Exception as err:  # a slow (Python-only) tokenizer, or one the library can't read
        raise GrammarUnavailableError(
            f"structured output needs a fast tokenizer the grammar library can read: "
            f"{type(hf_tokenizer).__name__}: {_one_line(err)}"
        ) from None


def grammar_of(spec: GrammarSpec) -> str:
    """The library's grammar text for ``spec`` (not yet checked)."""
    matcher = llguidance.LLMatcher
    if spec.kind == "json_schema":
        try:
            return matcher.grammar_from_json_schema(spec.text, defaults=_COMPACT_JSON)
        except ValueError as err:  # not JSON, or not an object
            raise GrammarError(_one_line(err)) from None
    if spec.kind == "json_object":
        return matcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_COMPACT_JSON)
    if spec.kind == "regex":
        return matcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        # Each option a Lark string literal; a JSON string is one (quotes, backslashes and
        # control characters escaped), so any option text is matched literally.
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in spec.options)
        )
    return matcher.grammar_from_lark(spec.text)


def compile_template(index: TokenizerIndex, spec: GrammarSpec) -> llguidance.LLMatcher:
    """``spec`` compiled against ``index``, its first mask computed; ``GrammarError`` when
    it is not a valid grammar (a schema keyword the library can't enforce included)."""
    if spec.kind == "json_schema":
        _check_schema_document(spec.text)
    template = llguidance.LLMatcher(
        index.tokenizer, grammar_of(spec), log_level=_SILENT, limits=parser_limits()
    )
    if not template.is_error():
        template.compute_bitmask()  # builds the lazy lexer now, not in a row's first step
    if template.is_error():
        raise GrammarError(_one_line(template.get_error()))
    return template


def _check_schema_document(text: str) -> None:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise GrammarError(f"not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise GrammarError(
            "nested too deeply to read (a JSON Schema of a few hundred levels)"
        ) from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON Schema is an object, not a {type(schema).__name__}")


def _one_line(err: object) -> str:
    """The library's message, folded onto one line and kept short (a schema error may quote
    the schema)."""
    return short_reason(str(err))


def short_reason(text: str) -> str:
    """``text`` on one line, at most ``MAX_REASON_CHARS`` characters."""
    text = " ".join(text.split())
    if len(text) <= MAX_REASON_CHARS:
        return text
    return text[: MAX_REASON_CHARS - 3] + "..."
