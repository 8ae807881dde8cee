"""Batched sampling: the next token of every row at once, each with its own settings.

Every setting is a per-row tensor over the whole batch, so a step costs the same handful of
kernels however many rows use it (a feature no row uses costs nothing). In order:

1. logit bias and suppressed tokens (end tokens under ``min_new_tokens``): one scatter-add of
   (row, token, value) triples;
2. penalties, on the tokens each row has seen only (a gather and a scatter over those, never
   a pass over the vocabulary): repetition (transformers') over its prompt's and generated
   tokens, then presence and frequency (OpenAI's) over its generated tokens' counts;
3. greedy rows take the argmax of that;
4. sampling rows divide by their temperature, keep their top-k and top-p (nucleus), and
   draw by inverting the cumulative distribution with ONE uniform number each: a hash of
   the row's seed and of how many tokens it has generated (``uniform``), computed on the
   host and uploaded with the step's inputs. A seeded row's tokens so depend on its seed,
   its position and its own logits only: never on its company, on bucket padding, or on a
   retry;
5. log-probabilities, when a row asks for them, from the distribution the token was drawn
   from (a greedy row's: the penalised logits').
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lmserve_server.engine.types import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, counter: int) -> float:
    """A number in (0, 1], a function of (seed, counter) alone (SplitMix64, 53 bits)."""
    bits = _splitmix64(_splitmix64(seed & _MASK64) ^ (counter & _MASK64))
    return ((bits >> 11) + 1) * 2.0**-53


@dataclass(frozen=True)
class RowSampling:
    """One row's settings for one token: its request's ``params``, its ``seed`` (drawn when
    the request gave none), ``counter`` (how many tokens it has generated), the tokens this
    step may not choose (``suppress``), the distinct tokens of its prompt and how often it
    generated each token (read when it has a penalty), and how many logprobs it wants."""

    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    counter: int = 0
    suppress: tuple[int, ...] = ()
    prompt_tokens: Collection[int] = ()
    generated_counts: Mapping[int, int] = field(default_factory=dict)
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.params.greedy


@dataclass
class SamplingColumns:
    """A batch's settings as flat columns, as the runner uploads them, and the batch-level
    flags (read on the host, so that nothing waits for the device)."""

    ints: dict[str, list[int]] = field(default_factory=dict)
    floats: dict[str, list[float]] = field(default_factory=dict)
    rows: int = 0
    any_sampling: bool = False
    max_top_k: int = 0
    any_top_p: bool = False
    any_edits: bool = False
    any_repetition: bool = False
    any_generated_penalty: bool = False
    max_logprobs: int | None = None  # None: no row asks


def columns_of(rows: Sequence[RowSampling]) -> SamplingColumns:
    sampling = [r for r in rows if not r.greedy]
    edits = [
        (i, token, value)
        for i, r in enumerate(rows)
        for token, value in (*r.params.logit_bias, *((t, float("-inf")) for t in r.suppress))
    ]
    # (row, token) for every token a repetition-penalised row has seen (a token seen in both
    # prompt and output comes twice: both places get the same new value).
    repeated = [
        (i, token)
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0
        for token in (*r.prompt_tokens, *r.generated_counts)
    ]
    generated = [
        (i, token, count)
        for i, r in enumerate(rows)
        if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
        for token, count in r.generated_counts.items()
    ]
    asked = [r.logprobs for r in rows if r.logprobs is not None]
    return SamplingColumns(
        ints={
            "top_k": [r.params.top_k if not r.greedy else 0 for r in rows],
            "edit_rows": [i for i, _, _ in edits],
            "edit_tokens": [t for _, t, _ in edits],
            "repeated_rows": [i for i, _ in repeated],
            "repeated_tokens": [t for _, t in repeated],
            "generated_rows": [i for i, _, _ in generated],
            "generated_tokens": [t for _, t, _ in generated],
            "generated_counts": [c for _, _, c in generated],
        },
        floats={
            "temperature": [r.params.temperature for r in rows],
            "top_p": [r.params.top_p if not r.greedy else 1.0 for r in rows],
            "uniform": [uniform(r.seed, r.counter) if not r.greedy else 1.0 for r in rows],
            "repetition": [r.params.repetition_penalty for r in rows],
            "presence": [r.params.presence_penalty for r in rows],
            "frequency": [r.params.frequency_penalty for r in rows],
            "edit_values": [v for _, _, v in edits],
        },
        rows=len(rows),
        any_sampling=bool(sampling),
        max_top_k=max((r.params.top_k for r in sampling), default=0),
        any_top_p=any(r.params.top_p < 1.0 for r in sampling),
        any_edits=bool(edits),
        any_repetition=bool(repeated),
        any_generated_penalty=bool(generated),
        max_logprobs=max(asked) if asked else None,
    )


@dataclass
class SamplingTensors:
    """The batch's settings as tensors on the model's device (R rows)."""

    columns: SamplingColumns
    temperature: torch.Tensor  # (R,) float32; 1 for greedy rows (unused there)
    greedy: torch.Tensor  # (R,) bool
    top_k: torch.Tensor  # (R,) int64; 0 = no limit
    top_p: torch.Tensor  # (R,) float32; 1 = no limit
    uniform: torch.Tensor  # (R,) float64 in (0, 1]
    repetition: torch.Tensor  # (R,) float32
    presence: torch.Tensor  # (R,) float32
    frequency: torch.Tensor  # (R,) float32
    edit_rows: torch.Tensor  # (E,)
    edit_tokens: torch.Tensor  # (E,)
    edit_values: torch.Tensor  # (E,) float64
    repeated_rows: torch.Tensor  # (H,): the tokens a repetition-penalised row has seen
    repeated_tokens: torch.Tensor  # (H,)
    generated_rows: torch.Tensor  # (G,): the distinct tokens a row has generated
    generated_tokens: torch.Tensor  # (G,)
    generated_counts: torch.Tensor  # (G,) how often


def tensors_from(columns: SamplingColumns, views: dict[str, torch.Tensor]) -> SamplingTensors:
    """``SamplingTensors`` over device views of the uploaded columns (``views[name]``: ints
    as int64, floats as float64)."""
    raw_temperature = views["temperature"].float()
    greedy = raw_temperature == 0.0
    return SamplingTensors(
        columns=columns,
        temperature=raw_temperature.masked_fill(greedy, 1.0),
        greedy=greedy,
        top_k=views["top_k"],
        top_p=views["top_p"].float(),
        uniform=views["uniform"],
        repetition=views["repetition"].float(),
        presence=views["presence"].float(),
        frequency=views["frequency"].float(),
        edit_rows=views["edit_rows"],
        edit_tokens=views["edit_tokens"],
        edit_values=views["edit_values"],
        repeated_rows=views["repeated_rows"],
        repeated_tokens=views["repeated_tokens"],
        generated_rows=views["generated_rows"],
        generated_tokens=views["generated_tokens"],
        generated_counts=views["generated_counts"],
    )


def sampling_tensors(rows: Sequence[RowSampling], device: torch.device) -> SamplingTensors:
    """``SamplingTensors`` for ``rows``, each column uploaded on its own (the static path's
    way; the continuous runner uploads them with the rest of its step)."""
    columns = columns_of(rows)
    views = {
        name: torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
        for name, values in columns.ints.items()
    }
    views.update(
        {
            name: torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
            for name, values in columns.floats.items()
        }
    )
    return tensors_from(columns, views)


@dataclass
class Sampled:
    """A step's choices: ``tokens`` (R,), and with logprobs asked, each token's logprob (R,)
    and the top alternatives' ids and logprobs (R, N)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def packed(self) -> torch.Tensor:
        """Everything in one (R, 2 + 2N) float64 tensor, for ONE device-to-host copy (token
        ids are exact in float64)."""
        parts = [self.tokens.double()[:, None]]
        if self.logprobs is not None and self.top_ids is not None:
            assert self.top_logprobs is not None
            parts += [self.logprobs.double()[:, None], self.top_ids.double(), self.top_logprobs]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def unpack(values: Sequence[float], logprobs: int | None) -> tuple[int, TokenLogprob | None]:
    """A row of ``Sampled.packed()`` (token, logprob, N top ids, N top logprobs) as the
    token and, when the row asked for ``logprobs``, its ``TokenLogprob``."""
    token = int(values[0])
    if logprobs is None:
        return token, None
    n = (len(values) - 2) // 2
    top = tuple((int(values[2 + i]), float(values[2 + n + i])) for i in range(min(logprobs, n)))
    return token, TokenLogprob(token, float(values[1]), top)


def sample(logits: torch.Tensor, params: SamplingTensors) -> Sampled:
    """The next token of each row from its logits (R, V)."""
    columns = params.columns
    scores = logits.float()
    if columns.any_edits or columns.any_repetition or columns.any_generated_penalty:
        scores = scores.clone()  # edited in place below; the model's logits stay as they are
    if columns.any_edits:
        scores.index_put_(
            (params.edit_rows, params.edit_tokens), params.edit_values.float(), accumulate=True
        )
    _penalise(scores, params)
    # max's indices are argmax's (the first of equal maxima) in half the time on a CPU.
    greedy_tokens = scores.max(dim=-1).indices
    if not columns.any_sampling and columns.max_logprobs is None:
        return Sampled(greedy_tokens)
    scaled = _scaled_and_filtered(scores, params)
    tokens = greedy_tokens
    if columns.any_sampling:
        probs = torch.softmax(scaled, dim=-1)
        # Inverse transform sampling: the first token whose cumulative probability reaches u.
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (R, V)
        target = params.uniform[:, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=logits.shape[-1] - 1)
        tokens = torch.where(params.greedy, greedy_tokens, drawn)
    if columns.max_logprobs is None:
        return Sampled(tokens)
    logprobs = torch.log_softmax(scaled, dim=-1)  # a greedy row's: temperature 1, unfiltered
    top = torch.topk(logprobs, max(columns.max_logprobs, 1), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    n = columns.max_logprobs
    return Sampled(tokens, chosen, top.indices[:, :n], top.values[:, :n].double())


def filtered_probs(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Next-token probabilities (R, V) after each row's temperature, top-k and top-p."""
    return torch.softmax(_scaled_and_filtered(logits.float(), params), dim=-1)


def _scaled_and_filtered(scores: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Each row's scores over its temperature, its top-k and top-p applied (-inf outside)."""
    # Shift by the max first: a tiny temperature then gives a one-hot, never inf - inf = NaN.
    scaled = (scores - scores.max(dim=-1, keepdim=True).values) / params.temperature[:, None]
    return _filtered(scaled, params)


def _penalise(scores: torch.Tensor, params: SamplingTensors) -> None:
    """Repetition penalty on every token a row has seen, then presence and frequency
    penalties on the tokens it has generated; in place, on those entries only."""
    columns = params.columns
    if columns.any_repetition:
        seen = (params.repeated_rows, params.repeated_tokens)
        before = scores[seen]
        factor = params.repetition[params.repeated_rows]
        scores.index_put_(seen, torch.where(before > 0, before / factor, before * factor))
    if columns.any_generated_penalty:
        rows = params.generated_rows
        penalty = params.frequency[rows] * params.generated_counts.float() + params.presence[rows]
        scores.index_put_((rows, params.generated_tokens), -penalty, accumulate=True)


def _filtered(scaled: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Each sampling row's top-k and top-p applied (-inf outside); greedy rows untouched."""
    columns = params.columns
    if columns.max_top_k:
        kth = torch.topk(scaled, min(columns.max_top_k, scaled.shape[-1]), dim=-1).values
        k = params.top_k.clamp(min=1, max=kth.shape[-1])
        threshold = kth.gather(1, (k - 1)[:, None])  # (R, 1): each row's k-th largest
        limited = (params.top_k > 0)[:, None]
        scaled = scaled.masked_fill(limited & (scaled < threshold), float("-inf"))
    if columns.any_top_p:
        sorted_scores, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token once the tokens before it reach top_p (the most likely always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = (before >= params.top_p[:, None]) & (params.top_p < 1.0)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled
