"""The static engine (one ``generate`` per batch) alone, on a real checkpoint loaded from
disk through from_pretrained."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from lmserve_server.engine.model import Engine
from lmserve_server.engine.static import left_pad
from lmserve_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)

PROMPTS = [
    "Hello",
    "The future of AI is",
    "Once upon a time in a land far away there lived",
    "x",
    "gRPC servers batch requests",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "Why",
    "A much longer prompt that goes on and on about nothing in particular to pad the batch",
    "cat",
    "dog dog",
    "zebra",
    "the",
]


def request(engine: Engine, prompt: str, n: int = 12, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(tuple(engine.tokenize(prompt)), n, **kwargs)  # type: ignore[arg-type]


def generate(engine: Engine, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
    """One static batch of ``requests``; every row must succeed."""
    outcomes = engine.generate_batch([engine.new_row(r) for r in requests])
    assert all(isinstance(o, GenerationOutput) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def solo(engine: Engine, prompt: str, n: int = 12, **kwargs: object) -> GenerationOutput:
    return generate(engine, [request(engine, prompt, n, **kwargs)])[0]


def test_tokenizer_figures_from_the_tutorial(engine: Engine) -> None:
    assert engine.tokenize("Hello World") == [15496, 2159]
    assert engine.tokenize("<|endoftext|>") == [50256]
    assert engine.eos_token_id == 50256
    assert engine.tokenizer.pad_token == "<|endoftext|>"
    assert engine.tokenizer.padding_side == "left"


def test_left_padding_with_explicit_mask(engine: Engine) -> None:
    ids, mask = left_pad([[15496], [15496, 2159]], engine.eos_token_id, engine.input_device)
    assert ids.tolist() == [[50256, 15496], [15496, 2159]]
    assert mask.tolist() == [[0, 1], [1, 1]]


def test_loads_fp32_on_cpu_with_context_from_config(engine: Engine) -> None:
    assert engine.device == "cpu"
    assert engine.dtype == "float32"
    assert engine.max_context == 1024


def test_greedy_output_does_not_depend_on_the_batch(engine: Engine) -> None:
    alone = [solo(engine, p) for p in PROMPTS]
    together = generate(engine, [request(engine, p) for p in PROMPTS])
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    # Different prompts continue differently, so a row mix-up could not go unnoticed.
    assert len({o.token_ids for o in alone}) == len(PROMPTS)


def test_right_padding_would_change_the_output(engine: Engine) -> None:
    """Why left padding: with right padding a short prompt's continuation changes."""
    short, long = engine.tokenize("Hello"), engine.tokenize("Hello there my good friend")
    alone = solo(engine, "Hello", 6).token_ids
    pad = [engine.eos_token_id] * (len(long) - len(short))
    ids = torch.tensor([short + pad, long])
    mask = torch.tensor([[1] * len(short) + [0] * len(pad), [1] * len(long)])
    out = engine.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=50256
    )
    assert tuple(out[0, ids.shape[1] :].tolist()) != alone


def test_each_row_stops_at_its_own_max_new_tokens(engine: Engine) -> None:
    limits = [1, 5, 17, 3]
    outputs = generate(
        engine, [request(engine, p, n) for p, n in zip(PROMPTS, limits, strict=False)]
    )
    for out, n, p in zip(outputs, limits, PROMPTS, strict=False):
        assert len(out.token_ids) == n
        assert out.finish_reason is FinishReason.LENGTH
        assert out.token_ids == solo(engine, p, n).token_ids


def test_text_is_the_continuation_decoded_without_special_tokens(engine: Engine) -> None:
    out = solo(engine, "The future of AI is", 10)
    assert out.text == engine.tokenizer.decode(list(out.token_ids), skip_special_tokens=True)
    assert "The future of AI is" not in out.text


def test_eos_ends_a_row_and_is_not_returned(engine: Engine) -> None:
    """From the 4th decode step on, EOS is forced to be the most likely token."""
    steps = 0

    def favour_eos(module: object, inputs: object, logits: torch.Tensor) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if steps > 3:
            logits = logits.clone()
            logits[..., engine.eos_token_id] += 1e4
        return logits

    hook = engine.model.lm_head.register_forward_hook(favour_eos)
    try:
        out = solo(engine, "Hello", 8)
    finally:
        hook.remove()
    assert out.finish_reason is FinishReason.EOS
    assert len(out.token_ids) == 3
    assert engine.eos_token_id not in out.token_ids


def test_stop_string_cuts_the_text_before_it(engine: Engine) -> None:
    full = solo(engine, "The future of AI is", 20)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), "the random model's text is expected to have characters to stop on"
    out = generate(
        engine,
        [request(engine, "The future of AI is", 20, stop=(stop,)), request(engine, "Hello", 20)],
    )
    cut = full.text.index(stop)
    assert out[0].text == full.text[:cut]
    assert out[0].finish_reason is FinishReason.STOP
    assert stop in engine.tokenizer.decode(list(out[0].token_ids))
    assert full.token_ids[: len(out[0].token_ids)] == out[0].token_ids
    # The other row goes on to its own limit.
    assert len(out[1].token_ids) == 20


@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_sampling_repeats(engine: Engine, seed: int) -> None:
    sampling = SamplingParams(temperature=1.0, seed=seed)
    first = solo(engine, "Hello", 8, sampling=sampling)
    again = solo(engine, "Hello", 8, sampling=sampling)
    assert first.token_ids == again.token_ids


def test_different_seeds_sample_differently(engine: Engine) -> None:
    outs = {
        solo(engine, "Hello", 8, sampling=SamplingParams(temperature=1.0, seed=s)).token_ids
        for s in range(4)
    }
    assert len(outs) > 1


def test_sampling_rows_share_a_call_with_greedy_rows(engine: Engine) -> None:
    greedy_alone = solo(engine, "Hello", 10)
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=7)
    seeded_alone = solo(engine, "Hello", 10, sampling=seeded)
    mixed = generate(
        engine,
        [
            request(engine, "Hello", 10),
            request(engine, "Hello", 10, sampling=seeded),
            request(engine, "The future", 10, sampling=SamplingParams(temperature=0.5)),
        ],
    )
    assert mixed[0].token_ids == greedy_alone.token_ids
    assert mixed[1].token_ids == seeded_alone.token_ids
    assert mixed[1].token_ids != greedy_alone.token_ids


def test_a_cancelled_row_ends_its_share_of_the_call(engine: Engine) -> None:
    cancelled = engine.new_row(request(engine, "Hello", 50))
    cancelled.cancel()
    live = engine.new_row(request(engine, "Hi", 5))
    calls = 0

    def count(*args: object) -> None:
        nonlocal calls
        calls += 1

    hook = engine.model.register_forward_hook(count)
    try:
        out = engine.generate_batch([cancelled, live])
    finally:
        hook.remove()
    assert isinstance(out[1], GenerationOutput) and len(out[1].token_ids) == 5
    # A row cancelled before its batch ran takes no token; the call ends with the live row
    # (5 forwards: the prompt, then 4 steps), not after the 50 the cancelled row asked for.
    assert cancelled.tokens == []
    assert calls == 5


def test_a_row_cancelled_mid_batch_stops_at_the_next_step(engine: Engine) -> None:
    rows = [engine.new_row(request(engine, p, 30)) for p in ("Hello", "The future")]

    def cancel_after_3(delta: TextDelta) -> None:
        if rows[0].generated == 3:
            rows[0].cancel()

    rows[0] = engine.new_row(request(engine, "Hello", 30), on_delta=cancel_after_3)
    out = engine.generate_batch(rows)
    assert rows[0].generated == 3, "cancelled after its 3rd token, it took no 4th"
    assert isinstance(out[1], GenerationOutput) and len(out[1].token_ids) == 30


def test_streamed_deltas_are_the_row_s_text_and_tokens(engine: Engine) -> None:
    seen: list[list[TextDelta]] = [[], []]
    rows = [
        engine.new_row(request(engine, "Hello", 7), on_delta=seen[0].append),
        engine.new_row(request(engine, "The future of AI is", 12), on_delta=seen[1].append),
    ]
    out = engine.generate_batch(rows)
    for deltas, result in zip(seen, out, strict=True):
        assert isinstance(result, GenerationOutput)
        text = "".join(d.text for d in deltas)
        tokens = tuple(t for d in deltas for t in d.token_ids)
        assert result.text.startswith(text) and len(text) > 0
        assert result.token_ids[: len(tokens)] == tokens


def test_a_row_resumed_after_a_failed_batch_continues_without_repeating(engine: Engine) -> None:
    """A batch that fails after some steps leaves each row its tokens; run again, the row
    continues after them, its stream never repeats one, and it ends as it would have."""
    full = solo(engine, "The future of AI is", 16)
    sent: list[TextDelta] = []
    row = engine.new_row(request(engine, "The future of AI is", 16), on_delta=sent.append)
    forwards = 0

    def fail_on_6th(*args: object) -> None:
        nonlocal forwards
        forwards += 1
        if forwards == 6:
            raise RuntimeError("the device fell over")

    hook = engine.model.register_forward_pre_hook(fail_on_6th)
    try:
        with pytest.raises(RuntimeError):
            engine.generate_batch([row])
    finally:
        hook.remove()
    assert row.generated == 5
    [out] = engine.generate_batch([row])
    assert out == full
    streamed = tuple(t for d in sent for t in d.token_ids)
    assert streamed == full.token_ids[: len(streamed)], "no token sent twice"
