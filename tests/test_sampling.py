"""The batched sampler alone, on hand-made logits: per-row filters, counter-based draws
that ignore the batch's company and padding, and a kernel count that ignores the rows."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmserve_server.engine.sampling import (
    RowSampling,
    filtered_probs,
    sample,
    sampling_tensors,
    uniform,
)
from lmserve_server.engine.types import SamplingParams

CPU = torch.device("cpu")
_PER_STEP = {"seed", "counter", "suppress", "prompt_tokens", "generated_counts", "logprobs"}


def row_of(**settings: object) -> RowSampling:
    """A ``RowSampling`` from flat settings: the request's ones go to its ``params``."""
    params = {k: v for k, v in settings.items() if k not in _PER_STEP}
    step = {k: v for k, v in settings.items() if k in _PER_STEP}
    return RowSampling(SamplingParams(**params), **step)  # type: ignore[arg-type]


def probs_of(logits: list[float], **settings: float) -> torch.Tensor:
    row = row_of(**{"temperature": 1.0, **settings})
    return filtered_probs(torch.tensor([logits]), sampling_tensors([row], CPU))[0]


def test_top_k_keeps_the_k_most_likely() -> None:
    probs = probs_of([1.0, 5.0, 3.0, 4.0, 2.0], top_k=2)
    assert (probs > 0).tolist() == [False, True, False, True, False]
    assert abs(float(probs.sum()) - 1.0) < 1e-6


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert (probs_of(logits, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (probs_of(logits, top_p=0.1) > 0).tolist() == [True, False, False, False]
    assert (probs_of(logits, top_p=1.0) > 0).tolist() == [True] * 4


def test_temperature_sharpens_and_flattens() -> None:
    cold = probs_of([2.0, 1.0, 0.0], temperature=0.1)
    hot = probs_of([2.0, 1.0, 0.0], temperature=10.0)
    assert cold[0] > 0.99 and float(hot.max() - hot.min()) < 0.1


def test_each_row_filters_with_its_own_settings() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 3)
    rows = [
        row_of(temperature=1.0, top_k=1),
        row_of(temperature=1.0, top_k=3),
        row_of(temperature=1.0),
    ]
    kept = (filtered_probs(logits, sampling_tensors(rows, CPU)) > 0).sum(dim=1)
    assert kept.tolist() == [1, 3, 5]


def test_uniform_is_a_function_of_seed_and_counter() -> None:
    draws = [uniform(7, c) for c in range(1000)]
    assert draws == [uniform(7, c) for c in range(1000)]
    assert all(0.0 < u <= 1.0 for u in draws)
    assert len(set(draws)) == 1000 and uniform(8, 0) != uniform(7, 0)
    assert 0.45 < sum(draws) / len(draws) < 0.55


def test_draws_follow_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts: collections.Counter[int] = collections.Counter()
    for counter in range(4000):
        row = row_of(temperature=1.0, seed=3, counter=counter)
        counts[int(sample(logits, sampling_tensors([row], CPU)).tokens[0])] += 1
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(counts[token] / 4000 - p) < 0.03, counts


def random_rows(n: int, generator: torch.Generator) -> list[RowSampling]:
    """Greedy rows and sampling rows with every option: top-k, top-p, penalties over a
    history, logit bias, suppressed tokens, logprobs."""
    rows = []
    for i in range(n):
        kind = i % 4
        prompt, generated = {3, 5, 7, i}, {9: 2, 2 * i: 1}
        rows.append(
            row_of(
                repetition_penalty=1.3,
                prompt_tokens=prompt,
                generated_counts=generated,
                logprobs=2,
                logit_bias=((1, 2.0),),
            )
            if kind == 0
            else row_of(
                temperature=0.5 + float(torch.rand((), generator=generator)),
                top_k=[0, 5, 50][i % 3],
                top_p=[1.0, 0.9, 0.5][i % 3] if kind != 3 else 1.0,
                seed=i,
                counter=i * 7,
                frequency_penalty=0.5 * (i % 2),
                presence_penalty=0.3,
                prompt_tokens=prompt,
                generated_counts=generated,
                suppress=(0, 4) if i % 2 else (),
                logprobs=[None, 5, 0][i % 3],
            )
        )
    return rows


@pytest.mark.parametrize("position", [0, 5, 12])
def test_a_row_s_token_ignores_its_company_and_padding(position: int) -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 1000
    row = row_of(temperature=0.8, top_k=40, top_p=0.9, seed=11, counter=3)
    row_logits = torch.randn((1, vocab), generator=generator)
    alone = sample(row_logits, sampling_tensors([row], CPU)).tokens[0]
    company = random_rows(16, generator)  # every option, none of which may leak into `row`
    logits = torch.randn((17, vocab), generator=generator)
    logits[position] = row_logits[0]
    rows = [*company[:position], row, *company[position:]]
    assert sample(logits, sampling_tensors(rows, CPU)).tokens[position] == alone
    greedy_alone = sample(row_logits, sampling_tensors([RowSampling()], CPU)).tokens[0]
    rows[position] = RowSampling()
    assert sample(logits, sampling_tensors(rows, CPU)).tokens[position] == greedy_alone
    assert greedy_alone == row_logits.argmax()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_the_kernels_of_a_step_do_not_grow_with_the_rows() -> None:
    """Every option in use (penalties, bias, suppression, logprobs, top-k, top-p), from 4
    rows to 64: the same kernels."""
    generator = torch.Generator().manual_seed(1)
    counts = []
    for n in (4, 8, 64):
        rows = random_rows(n, generator)
        params = sampling_tensors(rows, CPU)
        logits = torch.randn((n, 500), generator=generator)
        with _CountOps() as mode:
            sample(logits, params)
        counts.append(mode.ops)
    assert counts[0] == counts[1] == counts[2], counts


def test_penalties_bias_and_suppression_change_only_their_row() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]] * 4)
    rows = [
        RowSampling(),
        row_of(repetition_penalty=2.0, prompt_tokens=(4, 1)),
        row_of(
            frequency_penalty=1.0,
            presence_penalty=0.5,
            prompt_tokens=(0,),
            generated_counts={4: 2, 3: 1},
        ),
        row_of(logit_bias=((1, 10.0),), suppress=(4,)),
    ]
    params = sampling_tensors(rows, CPU)
    from lmserve_server.engine.sampling import _penalise

    scores = logits.index_put(
        (params.edit_rows, params.edit_tokens), params.edit_values.float(), accumulate=True
    )
    _penalise(scores, params)
    assert scores[0].tolist() == [2.0, -1.0, 0.5, 1.0, 3.0]
    assert scores[1].tolist() == [2.0, -2.0, 0.5, 1.0, 1.5]  # seen: 4 (/2) and 1 (*2)
    # generated 4 twice and 3 once: 4 - 2*1 - 0.5, 3 - 1 - 0.5; the prompt's 0 untouched
    assert scores[2].tolist() == [2.0, -1.0, 0.5, -0.5, 0.5]
    assert scores[3].tolist() == [2.0, 9.0, 0.5, 1.0, float("-inf")]
    assert sample(logits, params).tokens.tolist() == [4, 0, 0, 1]


def test_logprobs_are_of_the_distribution_drawn_from() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    rows = [row_of(logprobs=2), row_of(temperature=1.0, top_k=2, seed=1, logprobs=3)]
    out = sample(logits, sampling_tensors(rows, CPU))
    assert out.top_ids is not None and out.top_logprobs is not None and out.logprobs is not None
    greedy, sampled = out.top_logprobs.exp().tolist()
    assert [round(p, 4) for p in greedy[:2]] == [0.5, 0.3]
    # top-k 2 renormalises to 0.625 / 0.375, and the others can't be drawn
    assert [round(p, 4) for p in sampled] == [0.625, 0.375, 0.0]
    assert out.tokens[0] == 0 and round(float(out.logprobs[0].exp()), 4) == 0.5
