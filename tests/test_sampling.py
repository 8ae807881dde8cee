"""The batched sampler alone, on hand-made logits: the filters against a sorted reference,
draws against the exact filtered distribution, the candidates' way against the whole
vocabulary's, counter-based draws that ignore the batch's company and padding, and a kernel
count that ignores the rows."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmserve_server.engine.sampling import (
    CANDIDATES,
    Sampled,
    nucleus_threshold,
    sample,
    seed_hash,
    uniform,
    uniform_tensor,
)
from lmserve_server.engine.sampling_slots import SamplingSlots
from lmserve_server.engine.types import GenerationRequest, SamplingParams

CPU = torch.device("cpu")
END = 3  # the end token of these tests' vocabularies


def request_of(
    min_new_tokens: int = 0,
    logprobs: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
    **params: object,
) -> GenerationRequest:
    return GenerationRequest(
        (1, 2),
        16,
        SamplingParams(**params),  # type: ignore[arg-type]
        stop_token_ids=stop_token_ids,
        min_new_tokens=min_new_tokens,
        logprobs=logprobs,
    )


def slots_for(
    requests: Sequence[GenerationRequest],
    vocab: int,
    counters: Sequence[int] | None = None,
    seen: Sequence[Sequence[int]] = (),
    generated: Sequence[Sequence[int]] = (),
) -> SamplingSlots:
    """A table with request i in slot i, each having drawn ``counters[i]`` tokens (or
    ``generated[i]``), having seen ``seen[i]``."""
    slots = SamplingSlots(len(requests), vocab, CPU, frozenset({END}))
    remaining = np.zeros(len(requests), dtype=np.int64)
    for i, r in enumerate(requests):
        tokens = list(generated[i]) if i < len(generated) else []
        slots.admit(i, r, seed=r.sampling.seed or 0, generated=tokens)
        if counters is not None:
            remaining[i] = counters[i] - len(tokens)
        if i < len(seen) and seen[i]:
            ids = torch.tensor(list(seen[i]))
            slots.mark_seen(torch.full_like(ids, i), ids)
    for step in range(int(remaining.max(initial=0))):
        slots.advance(np.nonzero(remaining > step)[0])
    return slots


def draw(
    logits: torch.Tensor,
    slots: SamplingSlots,
    device_only: bool = False,
    rows: list[int] | None = None,
) -> Sampled:
    rows = list(range(logits.shape[0])) if rows is None else rows
    return sample(logits, slots.rows(rows, torch.tensor(rows)), device_only=device_only)


def reference(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The filtered distribution by the book, in float64 over a sorted vocabulary:
    temperature, top-k, top-p over what top-k kept, min-p; ties at a cut are kept."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    ordered = probs.sort(descending=True).values
    threshold = 0.0
    if params.top_k:
        threshold = float(ordered[min(params.top_k, len(ordered)) - 1])
    if params.top_p < 1.0:
        kept = ordered[ordered >= threshold]
        before = torch.cat([torch.zeros(1, dtype=kept.dtype), kept.cumsum(0)[:-1]])
        inside = int((before < params.top_p * kept.sum()).sum())
        threshold = max(threshold, float(kept[inside - 1]))
    threshold = max(threshold, params.min_p * float(ordered[0]))
    kept_probs = probs * (probs >= threshold)
    return kept_probs / kept_probs.sum()


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=1.3, top_k=8, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_draws_follow_the_exact_filtered_distribution(params: SamplingParams) -> None:
    """4000 draws (one per counter) from a 12-token vocabulary: every token's frequency
    within 0.03 of the reference probability, none drawn outside the kept set."""
    logits = torch.tensor([[2.0, 1.5, 1.4, 1.0, 0.5, 0.4, 0.0, -0.5, -1.0, -1.0, -2.0, -3.0]])
    expected = reference(logits[0], params)
    counts: collections.Counter[int] = collections.Counter()
    draws = 4000
    for start in range(0, draws, 200):
        requests = [request_of(**{**vars(params), "seed": 9})] * 200
        slots = slots_for(requests, 12, counters=range(start, start + 200))
        counts.update(draw(logits.expand(200, -1), slots).tokens.tolist())
    for token, p in enumerate(expected.tolist()):
        assert abs(counts[token] / draws - p) < 0.03, (token, counts[token], p)
        assert p > 0 or counts[token] == 0


PAST_THE_CANDIDATES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.5, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=300, top_p=0.95),
    SamplingParams(temperature=1.0, min_p=0.5),
]


@pytest.mark.parametrize("params", PAST_THE_CANDIDATES, ids=str)
def test_draws_past_the_candidates_follow_the_exact_filtered_distribution(
    params: SamplingParams,
) -> None:
    """A flat distribution over 2000 tokens, whose nucleus is far more than the candidates:
    the exact pass. The kept set is the reference's, and the draws' mass over the kept
    tokens in ten bands of probability follows the reference (chi-square, 9 degrees of
    freedom, p = 0.001)."""
    vocab = 2000
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn((1, vocab), generator=generator) * 0.3
    expected = reference(logits[0], params)
    draws = 3000
    requests = [request_of(**{**vars(params), "seed": 4})] * draws
    slots = slots_for(requests, vocab, counters=range(draws))
    tokens = draw(logits.expand(draws, -1), slots).tokens
    assert bool((expected[tokens] > 0).all()), "a token outside the kept set was drawn"
    kept = (expected > 0).nonzero()[:, 0]
    assert len(kept) > CANDIDATES + 1
    bands = kept[expected[kept].argsort()].tensor_split(10)
    observed = [int(torch.isin(tokens, band).sum()) for band in bands]
    mass = [float(expected[band].sum()) * draws for band in bands]
    chi2 = sum((o - m) ** 2 / m for o, m in zip(observed, mass, strict=True))
    assert chi2 < 27.9, (observed, mass)


def random_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Peaked, flat and tied rows."""
    spread = torch.tensor([4.0, 0.2, 1.0, 2.0])[torch.arange(rows) % 4][:, None]
    logits = torch.randn((rows, vocab), generator=generator) * spread
    logits[3::4, : vocab // 2] = logits[3::4, :1]  # many equal logits
    return logits


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_candidates_and_the_whole_vocabulary_draw_the_same_tokens(
    params: SamplingParams,
) -> None:
    """Either way (candidates then the exact pass on a CPU, a sort of the vocabulary on a
    GPU) a row keeps the reference's tokens and draws the same one for the same number."""
    generator = torch.Generator().manual_seed(1)
    vocab = 700
    logits = random_logits(32, vocab, generator)
    for seed in range(6):
        requests = [request_of(**{**vars(params), "seed": seed * 100 + i}) for i in range(32)]
        slots = slots_for(requests, vocab)
        by_candidates = draw(logits, slots).tokens
        by_sorting = draw(logits, slots, device_only=True).tokens
        assert torch.equal(by_candidates, by_sorting)
        for row, token in enumerate(by_candidates.tolist()):
            assert float(reference(logits[row], params)[token]) > 0


def test_nucleus_threshold_is_the_sorted_cumulative_threshold() -> None:
    generator = torch.Generator().manual_seed(2)
    probs = torch.softmax(random_logits(24, 5000, generator), dim=-1)
    probs[5, 100:] = 0.0  # zeros, as top-k leaves them
    mass = torch.rand(24, generator=generator) * 0.98 + 0.01
    ordered = probs.sort(dim=-1, descending=True).values
    before = ordered.double().cumsum(dim=-1) - ordered.double()
    inside = (before < mass.double()[:, None]).sum(dim=-1)
    expected = ordered.gather(1, (inside - 1)[:, None])[:, 0]
    assert torch.equal(nucleus_threshold(probs, mass), expected)


def test_uniform_on_the_device_is_the_host_function() -> None:
    seeds = [0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1, 123456789123456789]
    counters = [0, 1, 2, 1000, 2**40 + 3]
    hashed = torch.tensor([seed_hash(s) for s in seeds for _ in counters])
    counter = torch.tensor([c for _ in seeds for c in counters])
    on_device = uniform_tensor(hashed, counter).tolist()
    assert on_device == [uniform(s, c) for s in seeds for c in counters]


def test_uniform_is_a_function_of_seed_and_counter() -> None:
    draws = [uniform(7, c) for c in range(1000)]
    assert draws == [uniform(7, c) for c in range(1000)]
    assert all(0.0 < u <= 1.0 for u in draws)
    assert len(set(draws)) == 1000 and uniform(8, 0) != uniform(7, 0)
    assert 0.45 < sum(draws) / len(draws) < 0.55


def test_each_token_of_a_row_draws_a_new_number() -> None:
    """One slot, drawn from again and again over a uniform distribution of 1000 tokens as
    its counter advances: its tokens spread over the vocabulary."""
    slots = slots_for([request_of(temperature=1.0, seed=3)], 1000)
    logits = torch.zeros((1, 1000))
    tokens = []
    for _ in range(64):
        tokens.append(int(draw(logits, slots).tokens[0]))
        slots.advance([0])
    assert len(set(tokens)) > 55
    assert {t * 4 // 1000 for t in tokens} == {0, 1, 2, 3}


def company(n: int) -> list[GenerationRequest]:
    """Greedy rows and sampling rows with every option: top-k (within the candidates and
    beyond), top-p, min-p, penalties, logit bias, suppressed tokens, logprobs."""
    requests = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            requests.append(request_of(repetition_penalty=1.3, logprobs=2, logit_bias=((1, 2.0),)))
        else:
            requests.append(
                request_of(
                    temperature=0.5 + 0.1 * kind,
                    top_k=[0, 5, 50, 300][kind % 4],
                    top_p=[1.0, 0.9, 0.5, 0.95][i % 4],
                    min_p=0.05 * (i % 3 == 0),
                    seed=i,
                    frequency_penalty=0.5 * (i % 2),
                    presence_penalty=0.3,
                    min_new_tokens=2 * (i % 2),
                    stop_token_ids=(7,) if i % 2 else (),
                    logprobs=[None, 5, 0][i % 3],
                )
            )
    return requests


@pytest.mark.parametrize("position", [0, 5, 12])
def test_a_row_s_token_ignores_its_company_and_padding(position: int) -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 1000
    row = request_of(temperature=0.8, top_k=40, top_p=0.9, seed=11)
    row_logits = torch.randn((1, vocab), generator=generator)
    alone = draw(row_logits, slots_for([row], vocab, counters=[3])).tokens[0]
    others = company(16)  # every option, none of which may leak into `row`
    logits = torch.randn((17, vocab), generator=generator)
    logits[position] = row_logits[0]
    requests = [*others[:position], row, *others[position:]]
    counters = [i * 7 for i in range(17)]
    counters[position] = 3
    history = [[3, 5, 7, i] for i in range(17)]
    slots = slots_for(requests, vocab, counters=counters, seen=history)
    assert draw(logits, slots).tokens[position] == alone
    greedy = request_of()
    greedy_alone = draw(row_logits, slots_for([greedy], vocab)).tokens[0]
    requests[position] = greedy
    slots = slots_for(requests, vocab, counters=counters, seen=history)
    assert draw(logits, slots).tokens[position] == greedy_alone == row_logits.argmax()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_the_kernels_of_a_step_do_not_grow_with_the_rows() -> None:
    """Every option in use (penalties, bias, suppression, logprobs, top-k within and beyond
    the candidates, top-p on peaked and flat rows, min-p), from 5 rows to 60: the same
    kernels."""
    generator = torch.Generator().manual_seed(1)
    counts = []
    for n in (5, 10, 60):
        slots = slots_for(company(n), 500, counters=[i for i in range(n)], seen=[[1, 2]] * n)
        logits = random_logits(n, 500, generator)
        with _CountOps() as mode:
            draw(logits, slots)
        counts.append(mode.ops)
    assert counts[0] == counts[1] == counts[2], counts


def test_penalties_bias_and_suppression_change_only_their_row() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]] * 5)
    requests = [
        request_of(),
        request_of(repetition_penalty=2.0),
        request_of(frequency_penalty=1.0, presence_penalty=0.5),
        request_of(logit_bias=((1, 10.0),), min_new_tokens=1, stop_token_ids=(4,)),
        request_of(min_new_tokens=1),  # suppresses the end token 3 (and nothing else)
    ]
    slots = slots_for(
        requests,
        5,
        seen=[[], [4, 1], [0], [], []],
        generated=[[], [], [4, 4, 3], [], []],
    )
    out = draw(logits, slots)
    # row 1: seen 4 (3 / 2) and 1 (-1 * 2): 0 wins. row 2: generated 4 twice, 3 once:
    # 3 - 2 - 0.5 = 0.5 and 1 - 1 - 0.5 = -0.5: 0 wins. row 3: 1 + 10, and 4 suppressed.
    # row 4: 4 still wins (only 3 is suppressed).
    assert out.tokens.tolist() == [4, 0, 0, 1, 4]
    slots.advance([3])  # row 3 has its one token: 4 allowed again, but 1 has the bias
    logits[3, 4] = 20.0
    assert int(draw(logits, slots).tokens[3]) == 4


def test_logprobs_are_of_the_distribution_drawn_from() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    requests = [request_of(logprobs=2), request_of(temperature=1.0, top_k=2, seed=1, logprobs=3)]
    out = draw(logits, slots_for(requests, 4))
    assert out.top_ids is not None and out.top_logprobs is not None and out.logprobs is not None
    greedy, sampled = out.top_logprobs.exp().tolist()
    assert [round(p, 4) for p in greedy[:2]] == [0.5, 0.3]
    # top-k 2 renormalises to 0.625 / 0.375, and the others can't be drawn
    assert [round(p, 4) for p in sampled] == [0.625, 0.375, 0.0]
    assert out.tokens[0] == 0 and round(float(out.logprobs[0].exp()), 4) == 0.5


def test_a_drawn_token_s_logprob_is_its_own() -> None:
    """Over many draws from a flat distribution, each reported logprob is the log of the
    drawn token's filtered probability (not the most likely token's), and it appears as
    that token's entry among the alternatives when it is one."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((1, 50), generator=generator) * 0.5
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=2)
    expected = reference(logits[0], params)
    requests = [request_of(**{**vars(params)}, logprobs=20)] * 100
    out = draw(logits.expand(100, -1), slots_for(requests, 50, counters=range(100)))
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert len(set(out.tokens.tolist())) > 10
    for token, logprob, ids, top in zip(
        out.tokens.tolist(),
        out.logprobs.tolist(),
        out.top_ids.tolist(),
        out.top_logprobs.tolist(),
        strict=True,
    ):
        assert math.isclose(logprob, math.log(expected[token]), abs_tol=1e-5)
        if token in ids:
            assert math.isclose(top[ids.index(token)], logprob, abs_tol=1e-6)


def test_penalties_over_the_seen_tokens_are_penalties_over_whole_rows() -> None:
    """The CPU's penalties (the seen tokens, found on the host) and the GPU's (whole rows)
    give every row of a company with every option the same scores, hence tokens."""
    generator = torch.Generator().manual_seed(4)
    n, vocab = 20, 600
    history = [[(3 * i + k) % vocab for k in range(40)] for i in range(n)]
    generated = [[(7 * i + k) % vocab for k in range(i % 5)] for i in range(n)]
    slots = slots_for(company(n), vocab, seen=history, generated=generated)
    logits = random_logits(n, vocab, generator)
    seen_only = draw(logits, slots)
    whole_rows = draw(logits, slots, device_only=True)
    assert torch.equal(seen_only.tokens, whole_rows.tokens)
    rows = slots.rows(list(range(n)), torch.arange(n))
    from lmserve_server.engine.sampling import _penalise, _penalise_seen

    assert torch.equal(_penalise_seen(logits.clone(), rows), _penalise(logits.clone(), rows))
