"""Batched sampling: the next token of every row at once, each with its own settings.

Temperature, top-k and top-p are per-row tensors over the whole batch, so a step costs the
same handful of kernels however many rows sample; greedy rows take the argmax, untouched.
Randomness is counter-based: a sampling row draws ONE uniform number per token, a hash of
its seed and of how many tokens it has generated (``uniform``), computed on the host and
uploaded with the step's inputs, then inverts the cumulative distribution of its own
filtered probabilities with it. A seeded row's tokens so depend on its seed, its position
and its own logits only: never on its company, on bucket padding, or on a retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
    """One row's settings for one token: ``counter`` is how many tokens it has generated."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    counter: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplingTensors:
    """The batch's settings as tensors (R rows), and which filters any row uses."""

    temperature: torch.Tensor  # (R,) float32; 1 for greedy rows (unused there)
    top_k: torch.Tensor  # (R,) int64; 0 = no limit
    top_p: torch.Tensor  # (R,) float32; 1 = no limit
    uniform: torch.Tensor  # (R,) float64 in (0, 1]
    greedy: torch.Tensor  # (R,) bool
    any_sampling: bool
    max_top_k: int  # 0 when no row limits top-k
    any_top_p: bool


def host_columns(rows: Sequence[RowSampling]) -> tuple[list[int], list[float]]:
    """The settings as the runner uploads them: a (top_k) int column and (temperature,
    top_p, uniform) float columns, R values each; greedy rows have temperature 0."""
    ints = [r.top_k if not r.greedy else 0 for r in rows]
    floats = (
        [r.temperature for r in rows]
        + [r.top_p if not r.greedy else 1.0 for r in rows]
        + [uniform(r.seed, r.counter) if not r.greedy else 1.0 for r in rows]
    )
    return ints, floats


def tensors_from_columns(
    rows: Sequence[RowSampling], top_k: torch.Tensor, floats: torch.Tensor
) -> SamplingTensors:
    """``SamplingTensors`` over uploaded columns (``host_columns``' layout); the batch-level
    flags come from the host-side ``rows``, so nothing waits for the device."""
    n = len(rows)
    temperature = floats[:n].float()
    greedy = temperature == 0.0
    return SamplingTensors(
        temperature=temperature.masked_fill(greedy, 1.0),
        top_k=top_k,
        top_p=floats[n : 2 * n].float(),
        uniform=floats[2 * n : 3 * n],
        greedy=greedy,
        any_sampling=any(not r.greedy for r in rows),
        max_top_k=max((r.top_k for r in rows if not r.greedy), default=0),
        any_top_p=any(r.top_p < 1.0 for r in rows if not r.greedy),
    )


def sampling_tensors(rows: Sequence[RowSampling], device: torch.device) -> SamplingTensors:
    """``SamplingTensors`` for ``rows``, uploaded on their own (the static path's way)."""
    ints, floats = host_columns(rows)
    return tensors_from_columns(
        rows,
        torch.tensor(ints, dtype=torch.long).to(device, non_blocking=True),
        torch.tensor(floats, dtype=torch.float64).to(device, non_blocking=True),
    )


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The next token (R,) of each row from its logits (R, V)."""
    greedy_tokens = logits.argmax(dim=-1)
    if not params.any_sampling:
        return greedy_tokens
    probs = filtered_probs(logits, params)
    # Inverse transform sampling: the first token whose cumulative probability reaches u.
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (R, V)
    target = params.uniform[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    return torch.where(params.greedy, greedy_tokens, drawn)


def filtered_probs(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Next-token probabilities (R, V) after each row's temperature, top-k and top-p."""
    # Shift by the max first: a tiny temperature then gives a one-hot, never inf - inf = NaN.
    scaled = logits.float()
    scaled = (scaled - scaled.max(dim=-1, keepdim=True).values) / params.temperature[:, None]
    if params.max_top_k:
        kth = torch.topk(scaled, min(params.max_top_k, scaled.shape[-1]), dim=-1).values
        k = params.top_k.clamp(min=1, max=kth.shape[-1])
        threshold = kth.gather(1, (k - 1)[:, None])  # (R, 1): each row's k-th largest
        limited = (params.top_k > 0)[:, None]
        scaled = scaled.masked_fill(limited & (scaled < threshold), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.any_top_p:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token once the tokens before it reach top_p (the most likely always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = (before >= params.top_p[:, None]) & (params.top_p < 1.0)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs
