"""``Row``, the one home of per-row rules, fed tokens by hand over the real GPT-2 tokenizer:
what the model would choose is not under test here, what a row makes of it is."""

from __future__ import annotations

from lmserve_server.engine.model import Engine
from lmserve_server.engine.rows import Row
from lmserve_server.engine.types import FinishReason, GenerationRequest, SamplingParams, TextDelta
from lmserve_server.errors import ShuttingDownError

TEXT = "One two three four, naïve café — 世界 🙂 five six seven."


def make_row(
    engine: Engine, n: int = 100, stop: tuple[str, ...] = (), stream: list[TextDelta] | None = None
) -> Row:
    request = GenerationRequest((15496,), n, stop=stop)
    return engine.new_row(request, on_delta=stream.append if stream is not None else None)


def feed(row: Row, tokens: list[int]) -> int:
    """Accepts tokens until the row ends; returns how many it took."""
    for i, token in enumerate(tokens):
        if row.accept(token):
            return i + 1
    return len(tokens)


def test_a_row_ends_at_its_limit(engine: Engine) -> None:
    row = make_row(engine, n=4)
    tokens = engine.tokenize(TEXT)
    assert feed(row, tokens) == 4
    out = row.output()
    assert out.token_ids == tuple(tokens[:4])
    assert out.text == engine.decode(tokens[:4])
    assert out.finish_reason is FinishReason.LENGTH


def test_the_end_token_ends_a_row_and_is_not_part_of_it(engine: Engine) -> None:
    row = make_row(engine)
    tokens = engine.tokenize("Hello there")
    assert feed(row, [*tokens, engine.eos_token_id, 11]) == len(tokens) + 1
    out = row.output()
    assert out.token_ids == tuple(tokens) and out.text == "Hello there"
    assert out.finish_reason is FinishReason.EOS


def test_a_stop_string_cuts_the_text_and_keeps_the_token_that_completed_it(
    engine: Engine,
) -> None:
    tokens = engine.tokenize(TEXT)
    row = make_row(engine, stop=("four,", "never"))
    taken = feed(row, tokens)
    out = row.output()
    assert out.finish_reason is FinishReason.STOP
    assert out.text == "One two three "
    assert "four," in engine.decode(out.token_ids)
    assert "four," not in engine.decode(out.token_ids[:-1])
    assert taken == len(out.token_ids)


def test_a_stream_never_sends_a_possible_stop_string(engine: Engine) -> None:
    stream: list[TextDelta] = []
    row = make_row(engine, stop=("three f",), stream=stream)
    feed(row, engine.tokenize("one two three four"))
    sent = "".join(d.text for d in stream)
    assert "three" not in sent
    assert row.output().text == "one two "
    assert row.output().text.startswith(sent)
    # A tail that turned out not to be the stop string goes out later.
    stream.clear()
    row = make_row(engine, stop=("three f",), stream=stream)
    feed(row, engine.tokenize("one two three x"))
    assert "".join(d.text for d in stream) == "one two three x"


def test_streamed_deltas_concatenate_to_the_result_text_and_tokens(engine: Engine) -> None:
    stream: list[TextDelta] = []
    tokens = engine.tokenize(TEXT)
    row = make_row(engine, n=len(tokens) - 1, stream=stream)
    feed(row, tokens)
    out = row.output()
    text = "".join(d.text for d in stream)
    ids = tuple(t for d in stream for t in d.token_ids)
    # The row ended on its limit: everything but the last token's text has been sent (the
    # last goes in the final message, with the finish reason).
    assert out.text.startswith(text) and out.token_ids[: len(ids)] == ids
    assert all("\ufffd" not in d.text for d in stream)
    assert out.text == engine.decode(tokens[:-1])


def test_a_cancelled_row_takes_no_more_tokens(engine: Engine) -> None:
    row = make_row(engine)
    row.accept(11)
    row.cancel()
    assert row.done and row.accept(12)
    assert row.tokens == [11]


def test_an_aborted_row_carries_its_error(engine: Engine) -> None:
    row = make_row(engine)
    error = ShuttingDownError("stopped")
    row.abort(error)
    row.abort(ShuttingDownError("a second reason is ignored"))
    assert row.done and row.error is error


def test_a_row_has_its_seed_or_draws_one_for_good(engine: Engine) -> None:
    seeded = engine.new_row(GenerationRequest((1,), 2, SamplingParams(1.0, seed=5)))
    assert seeded.seed == 5
    drawn = [engine.new_row(GenerationRequest((1,), 2, SamplingParams(1.0))).seed for _ in range(3)]
    assert len(set(drawn)) == 3
