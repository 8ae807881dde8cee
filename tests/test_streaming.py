"""Text deltas over the real GPT-2 tokenizer, and the per-row sampling filters."""

from __future__ import annotations

import torch

from lmserve_server.engine import Engine
from lmserve_server.rows import _filtered_probs
from lmserve_server.streaming import TextDeltas
from lmserve_server.types import SamplingParams

MULTIBYTE = "naïve café — 世界の終わり 🙂🚀 ok"


def stream(engine: Engine, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextDeltas]:
    deltas = TextDeltas(engine.decode, stop)
    return [deltas.push(t)[0] for t in engine.tokenize(text)], deltas


def test_multibyte_characters_spanning_tokens_are_never_split(engine: Engine) -> None:
    tokens = engine.tokenize(MULTIBYTE)
    # The premise: some tokens of this text are pieces of one character.
    assert any("\ufffd" in engine.decode([t]) for t in tokens)
    pieces, deltas = stream(engine, MULTIBYTE)
    assert all("\ufffd" not in p for p in pieces)
    rest, rest_ids = deltas.finish(MULTIBYTE, tokens)
    assert "".join(pieces) + rest == MULTIBYTE
    assert rest == ""  # nothing held back once the text ends on a whole character
    assert rest_ids == []


def test_a_possible_stop_string_is_held_back_until_it_resolves(engine: Engine) -> None:
    pieces, deltas = stream(engine, "one two three four", stop=("three f",))
    sent = "".join(pieces)
    assert "three" not in sent
    assert sent == "one two "[: len(sent)]
    # A tail that turned out not to be the stop string is sent later.
    pieces, deltas = stream(engine, "one two three", stop=("three f",))
    rest, _ = deltas.finish("one two three", engine.tokenize("one two three"))
    assert "".join(pieces) + rest == "one two three"


def test_token_ids_travel_with_their_text(engine: Engine) -> None:
    tokens = engine.tokenize(MULTIBYTE)
    deltas = TextDeltas(engine.decode)
    sent_ids: list[int] = []
    for t in tokens:
        _text, ids = deltas.push(t)
        sent_ids += ids
        # The ids sent cover the text sent (they may run ahead by part of a character).
        assert engine.decode(sent_ids).startswith(deltas.sent_text)
    assert sent_ids == tokens


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [False, True, False, True, False]
    assert abs(float(probs.sum()) - 1.0) < 1e-6


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7)) > 0
    assert kept.tolist() == [True, True, False, False]
    kept = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.1)) > 0
    assert kept.tolist() == [True, False, False, False]


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = _filtered_probs(logits, SamplingParams(temperature=0.1))
    hot = _filtered_probs(logits, SamplingParams(temperature=10.0))
    assert cold[0] > 0.99 and float(hot.max() - hot.min()) < 0.1
