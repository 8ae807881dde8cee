"""The continuous decode batch alone, on the real checkpoint: rows that join and leave a
running batch get exactly the tokens the static engine gives them alone."""

from __future__ import annotations

import random

import pytest

from lmserve_server.continuous import DecodeBatch, Row
from lmserve_server.engine import Engine
from lmserve_server.types import FinishReason, GenerationRequest, RowControl, SamplingParams
from tests.test_engine import PROMPTS, request


def row(engine: Engine, prompt: str, n: int, **kwargs: object) -> Row:
    return Row(request=request(engine, prompt, n, **kwargs), generator=None)


def run_staggered(engine: Engine, rows: list[Row], join_every: int = 3) -> dict[int, list[int]]:
    """Admits one row every ``join_every`` steps; returns each row's tokens by index."""
    batch = DecodeBatch(engine)
    pending = list(enumerate(rows))
    finished: dict[int, list[int]] = {}
    index = {id(r): i for i, r in pending}
    step = 0
    while pending or len(batch):
        joining = [pending.pop(0)[1]] if pending and step % join_every == 0 else []
        if len(batch) or joining:
            for done in batch.step(joining):
                finished[index[id(done)]] = done.tokens
        step += 1
    return finished


def test_rows_joining_and_leaving_get_their_solo_tokens(engine: Engine) -> None:
    limits = [20, 4, 11, 1, 15, 7, 9, 3]
    rows = [row(engine, p, n) for p, n in zip(PROMPTS, limits, strict=False)]
    tokens = run_staggered(engine, rows)
    for i, (prompt, n) in enumerate(zip(PROMPTS, limits, strict=False)):
        solo = engine.generate_batch([request(engine, prompt, n)])[0]
        assert tuple(tokens[i]) == solo.token_ids, prompt


def test_a_long_row_leaving_frees_its_padding(engine: Engine) -> None:
    batch = DecodeBatch(engine)
    long_prompt = " ".join(["word"] * 60)
    batch.step([row(engine, long_prompt, 2), row(engine, "Hi", 10)])
    before = batch.padded_tokens
    while len(batch) == 2:
        batch.step()
    assert len(batch) == 1
    assert batch.padded_tokens < before / 4, "the short row must not keep the long one's pads"


def test_seeded_sample_matches_the_static_engine(engine: Engine) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    static = engine.generate_batch([request(engine, "Hello", 12, sampling=seeded)])[0]
    rows = [row(engine, "The future", 9), row(engine, "Hello", 12, sampling=seeded)]
    tokens = run_staggered(engine, rows, join_every=2)
    assert tuple(tokens[1]) == static.token_ids


def test_stop_strings_streams_and_cancellation(engine: Engine) -> None:
    full = engine.generate_batch([request(engine, "Once upon a time", 20)])[0]
    stop = full.text[len(full.text) // 2 :][:3]
    streamed: list[int] = []
    cancelled = RowControl()
    batch = DecodeBatch(engine)
    stopping = row(engine, "Once upon a time", 20, stop=(stop,))
    streaming = row(engine, "Hello", 6, control=RowControl(on_token=streamed.append))
    leaving = row(engine, "Bye", 50, control=cancelled)
    done = batch.step([stopping, streaming, leaving])
    cancelled.cancel()
    assert batch.drop_cancelled() == [leaving]
    while len(batch):
        done += batch.step()
    outputs = {id(r): batch.finish(r) for r in done}
    assert outputs[id(stopping)].finish_reason is FinishReason.STOP
    assert outputs[id(stopping)].text == full.text[: full.text.index(stop)]
    assert tuple(streamed) == outputs[id(streaming)].token_ids
    assert id(leaving) not in outputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_joins_and_leaves_get_their_solo_tokens(engine: Engine, seed: int) -> None:
    """Groups of 1-4 rows with 1-120-token prompts join at random steps, so the slot cache
    grows its slots and columns, shifts its window right for a wider prompt, moves it back
    to column 0 at the end of its buffers, and fills freed slots with the last row."""
    rng = random.Random(seed)
    requests = [
        GenerationRequest(
            tuple(rng.randrange(50000) for _ in range(rng.randint(1, 120))), rng.randint(1, 150)
        )
        for _ in range(14)
    ]
    batch = DecodeBatch(engine, max_rows=2)
    pending = [Row(request=r, generator=None) for r in requests]
    index = {id(r): i for i, r in enumerate(pending)}
    finished: dict[int, list[int]] = {}
    grew, moved = set(), 0
    while pending or len(batch):
        joining: list[Row] = []
        if pending and (not len(batch) or rng.random() < 0.3):
            count = rng.randint(1, 4)
            joining, pending = pending[:count], pending[count:]
        running, end = len(batch), batch._cache.end
        for done in batch.step(joining):
            finished[index[id(done)]] = done.tokens
        moved += bool(running) and batch._cache.end != end + 1  # the window was moved
        grew.add((batch._cache.slots, batch._cache.capacity))
    assert len(grew) > 2 and moved, "the run must make the cache grow and move"
    for i, r in enumerate(requests):
        assert tuple(finished[i]) == engine.generate_batch([r])[0].token_ids, i


def test_the_window_moves_back_when_it_reaches_the_end_of_the_buffers(engine: Engine) -> None:
    """A 60-token prompt sizes the buffers; after it leaves, a short row decodes on until
    its column reaches their end, and its keys move back to column 0 instead of growing."""
    long_row = row(engine, " ".join(["word"] * 60), 10)
    short_row = row(engine, "Hi", 150)
    batch = DecodeBatch(engine)
    batch.step([long_row])
    batch.step([short_row])
    capacity, moves = batch._cache.capacity, 0
    done: list[Row] = []
    while len(batch):
        end = batch._cache.end
        done += batch.step()
        moves += batch._cache.end < end
    assert moves and batch._cache.capacity > capacity, "it moves first, grows later"
    solo = engine.generate_batch([short_row.request])[0]
    assert tuple(short_row.tokens) == solo.token_ids
