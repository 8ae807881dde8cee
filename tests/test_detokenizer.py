"""Incremental detokenization over the real GPT-2 tokenizer: O(1) work per token, never a
split character, and exactly the text that decoding everything at once gives."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve_server.engine.detokenizer import IncrementalDetokenizer
from lmserve_server.engine.model import Engine

MULTIBYTE = "naïve café — 世界の終わり 🙂🚀 ok"


def pieces(engine: Engine, tokens: Sequence[int]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(engine.decode)
    return [detok.push(t) for t in tokens], detok


def test_multibyte_characters_spanning_tokens_are_never_split(engine: Engine) -> None:
    tokens = engine.tokenize(MULTIBYTE)
    # The premise: some tokens of this text are pieces of one character.
    assert any("\ufffd" in engine.decode([t]) for t in tokens)
    out, detok = pieces(engine, tokens)
    assert all("\ufffd" not in p for p in out)
    assert "".join(out) == MULTIBYTE
    assert detok.flush() == ""  # nothing pending once the text ends on a whole character


def test_an_incomplete_character_waits_then_comes_out_at_the_end(engine: Engine) -> None:
    tokens = engine.tokenize(MULTIBYTE)
    cut = next(i for i in range(1, len(tokens)) if engine.decode(tokens[:i]).endswith("\ufffd"))
    out, detok = pieces(engine, tokens[:cut])  # a character's first bytes, not its last
    assert "\ufffd" not in "".join(out)
    rest = detok.flush()
    assert rest.endswith("\ufffd")
    assert detok.text == "".join(out) + rest == engine.decode(tokens[:cut])


def test_each_token_decodes_a_bounded_window(engine: Engine) -> None:
    """O(1) per token: no decode call sees more than a few tokens, however long the text."""
    widths: list[int] = []

    def decode(tokens: Sequence[int]) -> str:
        widths.append(len(tokens))
        return engine.decode(tokens)

    detok = IncrementalDetokenizer(decode)
    for t in engine.tokenize(MULTIBYTE * 20):
        detok.push(t)
    assert detok.text == MULTIBYTE * 20
    assert max(widths) <= 6


# Byte-level pieces, whole words, multi-byte characters and the end token: what a random
# model strings together.
TOKEN_IDS = st.lists(
    st.one_of(
        st.integers(0, 50256),
        st.sampled_from([10263, 171, 253, 226, 20015, 236, 18433, 242, 31479, 50256]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(tokens=TOKEN_IDS)
def test_the_settled_text_is_the_whole_decode(engine: Engine, tokens: list[int]) -> None:
    out, detok = pieces(engine, tokens)
    final = detok.flush()
    assert "".join(out) + final == detok.text == engine.decode(tokens)
