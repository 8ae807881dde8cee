"""Batched sampling: the next token of every row at once, each with its own settings.

A step's rows arrive as ``StepRows``: per-row settings as device tensors gathered from the
per-slot tables (``sampling_slots.py``), plus what the host knows of them (which features any
row uses), so that a feature no row uses costs nothing and nothing waits for the device. In
order:

1. logit bias and suppressed tokens (end tokens under ``min_new_tokens``): scatter-adds;
   and for the rows under a grammar (structured output), -inf on every token their mask
   leaves out (``grammar/bitmask.py``: the masks filled on the host, unpacked with tensor
   ops; rows without one are not touched);
2. penalties from each slot's token history: repetition (transformers') over every token the
   row has seen, presence and frequency (OpenAI's) over its generated tokens' counts;
3. greedy rows take the argmax of that;
4. every other row divides by its temperature and keeps the tokens at or above ONE
   probability threshold, the tightest of its filters, in transformers' order: top-k (the
   k-th largest probability, ties kept), top-p on what top-k kept (the smallest set of most
   likely tokens reaching ``top_p`` of that mass, ties kept), min-p (``min_p`` times the
   largest probability);
5. it draws by inverting the cumulative distribution of the kept tokens, in vocabulary
   order, with ONE uniform number: a hash of the row's seed and of how many tokens it has
   generated (``uniform``), computed on the device from the slot's table. A seeded row's
   tokens so depend on its seed, its position and its own logits only: never on its
   company, on bucket padding, or on a retry;
6. log-probabilities, when a row asks for them, of the distribution the token was drawn from
   (a greedy row's: the penalised logits' at temperature 1).

Thresholds without sorting the vocabulary (a sort of 16 rows x 50k tokens costs more than
the model's LM head on a CPU): every row's ``CANDIDATES`` most likely tokens come from one
``topk``, and a row whose threshold lies above its last candidate is settled there, its draw
over those candidates alone. Only the other rows (a flat distribution whose nucleus holds
thousands of tokens, or plain temperature sampling) take the exact pass over the whole
vocabulary: the top-p threshold by a radix select (a histogram of probability mass over the
float's high bits, then a sort of the one bucket it falls in) and the draw by one cumulative
sum. Both ways keep the same tokens and draw the same one for the same uniform number (the
kept probabilities, summed in vocabulary order either way), so which way a row went never
shows. On a GPU, where a sort is cheap and a host round trip is not, ``device_only`` takes every
threshold from a sorted vocabulary instead, and penalties over whole rows (on a CPU they
touch only the tokens a row has seen, found on the host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmserve_server.engine.types import TokenLogprob

if TYPE_CHECKING:
    from lmserve_server.grammar.bitmask import BitmaskApplier

# How many of a row's most likely tokens the filters look at before the whole vocabulary:
# a real model's nucleus at top_p 0.9-0.95 mostly fits, and a top-k of up to this many
# always does. ``topk`` costs ~1.3 ms for 16 rows of 50k tokens on this project's CPU at 64,
# ~7 ms at 1024.
CANDIDATES = 64
MAX_CANDIDATES = 256  # a larger top_k than this goes to the exact pass

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_hash(seed: int) -> int:
    """The first SplitMix64 round of a seed, as the signed 64-bit value a table stores."""
    return _signed(_splitmix64(seed & _MASK64))


def uniform(seed: int, counter: int) -> float:
    """A number in (0, 1], a function of (seed, counter) alone (SplitMix64, 53 bits)."""
    bits = _splitmix64(_splitmix64(seed & _MASK64) ^ (counter & _MASK64))
    return ((bits >> 11) + 1) * 2.0**-53


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_tensor(hashed_seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """``uniform`` on the device: (R,) int64 ``seed_hash`` values and counters -> (R,) float64.
    int64 products wrap as uint64 ones do, so the bits are SplitMix64's."""
    x = (hashed_seed ^ counter) + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 11) + 1).double() * 2.0**-53


@dataclass
class StepRows:
    """A step's R rows as the sampler reads them: device tensors (R,) gathered from the
    slots' tables, the tables the penalties and edits read (None when no admitted request
    needs them), and the batch-level facts the host knows."""

    slots: torch.Tensor  # (R,) int64: each row's slot in the tables below
    greedy: torch.Tensor  # (R,) bool
    temperature: torch.Tensor  # (R,) float32; 1 for greedy rows
    top_k: torch.Tensor  # (R,) int64; 0 = no limit
    top_p: torch.Tensor  # (R,) float32; 1 = no limit
    min_p: torch.Tensor  # (R,) float32; 0 = no limit
    uniform: torch.Tensor  # (R,) float64 in (0, 1]
    repetition: torch.Tensor  # (R,) float32
    presence: torch.Tensor  # (R,) float32
    frequency: torch.Tensor  # (R,) float32
    suppressing: torch.Tensor  # (R,) bool: its end tokens may not be chosen this step
    biased: torch.Tensor  # (R,) bool: it has a logit bias
    seen: torch.Tensor | None  # (slots, V) bool: every token a slot's row has seen
    counts: torch.Tensor | None  # (slots, V) int32: how often it generated each token
    bias_tokens: torch.Tensor | None  # (slots, B) int64, padded with 0
    bias_values: torch.Tensor | None  # (slots, B) float32, padded with 0
    suppress_tokens: torch.Tensor | None  # (slots, S) int64, padded with -1
    # What the host knows (read from its copy of the tables).
    rows: int = 0
    any_sampling: bool = False
    any_filter: bool = False  # a sampling row with top-k, top-p or min-p
    max_top_k: int = 0
    any_top_p: bool = False
    any_bias: bool = False
    any_suppression: bool = False
    any_repetition: bool = False
    any_generated_penalty: bool = False
    max_logprobs: int | None = None  # None: no row asks
    # Rows under a grammar (set by the caller for the step): their indices (M,), their
    # masks (M, words) int32 on the device, and what unpacks them.
    grammar_rows: torch.Tensor | None = None
    grammar_masks: torch.Tensor | None = None
    grammar_applier: BitmaskApplier | None = None

    @property
    def edits_scores(self) -> bool:
        return (
            self.any_bias
            or self.any_suppression
            or self.any_repetition
            or self.any_generated_penalty
            or self.grammar_rows is not None
        )


@dataclass
class Sampled:
    """A step's choices: ``tokens`` (R,), and with logprobs asked, each token's logprob (R,)
    and the top alternatives' ids and logprobs (R, N)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Values per row of ``packed()``."""
        return 1 if self.top_ids is None else 2 + 2 * self.top_ids.shape[1]

    def packed(self) -> torch.Tensor:
        """Everything in one (R, width) float64 tensor, for ONE device-to-host copy (token
        ids are exact in float64)."""
        parts = [self.tokens.double()[:, None]]
        if self.logprobs is not None and self.top_ids is not None:
            assert self.top_logprobs is not None
            parts += [
                self.logprobs.double()[:, None],
                self.top_ids.double(),
                self.top_logprobs.double(),
            ]
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


def sample(logits: torch.Tensor, rows: StepRows, *, device_only: bool = False) -> Sampled:
    """The next token of each row from its logits (R, V). ``device_only``: nothing read back
    on the host (a GPU's way): thresholds from a sort of the whole vocabulary instead of
    candidates and the exact pass, penalties over whole rows instead of the seen tokens."""
    scores = logits.float()
    if rows.edits_scores:
        scores = scores.clone()  # edited in place below; the model's logits stay as they are
    _edit(scores, rows)
    scores = _penalise(scores, rows) if device_only else _penalise_seen(scores, rows)
    # max's indices are argmax's (the first of equal maxima) in half the time on a CPU.
    best = scores.max(dim=-1)
    if not rows.any_sampling and rows.max_logprobs is None:
        return Sampled(best.indices)
    # Shift by the max first: a tiny temperature then gives a one-hot, never inf - inf = NaN.
    probs = torch.softmax((scores - best.values[:, None]) / rows.temperature[:, None], dim=-1)
    choose = _choose_by_sorting if device_only else _choose_by_candidates
    chosen = choose(probs, rows)
    tokens = best.indices
    if rows.any_sampling:
        tokens = torch.where(rows.greedy, best.indices, chosen.drawn)
    if rows.max_logprobs is None:
        return Sampled(tokens)
    return _with_logprobs(tokens, probs, chosen, rows.max_logprobs)


# ---- 1, 2: edits and penalties ---------------------------------------------------------------


def _edit(scores: torch.Tensor, rows: StepRows) -> None:
    """Each row's logit bias, -inf on its end tokens while it suppresses them, and on the
    tokens its grammar does not allow; in place."""
    if rows.grammar_rows is not None:
        assert rows.grammar_masks is not None and rows.grammar_applier is not None
        rows.grammar_applier.apply(scores, rows.grammar_rows, rows.grammar_masks)
    if rows.any_bias:
        assert rows.bias_tokens is not None and rows.bias_values is not None
        values = rows.bias_values.index_select(0, rows.slots) * rows.biased[:, None]
        scores.scatter_add_(1, rows.bias_tokens.index_select(0, rows.slots), values)
    if rows.any_suppression:
        assert rows.suppress_tokens is not None
        tokens = rows.suppress_tokens.index_select(0, rows.slots)  # (R, S), -1 padded
        active = (tokens >= 0) & rows.suppressing[:, None]
        # Inactive entries add 0 to token 0: nothing changes.
        minus_inf = torch.zeros_like(tokens, dtype=scores.dtype).masked_fill_(active, float("-inf"))
        scores.scatter_add_(1, tokens.clamp(min=0), minus_inf)


def _penalise(scores: torch.Tensor, rows: StepRows) -> torch.Tensor:
    """Repetition penalty on every token a row has seen, then presence and frequency
    penalties on the tokens it has generated. A row without a penalty has neutral factors
    (1, 0, 0), which change no value, so every row goes through the same kernels."""
    if rows.any_repetition:
        assert rows.seen is not None
        seen = rows.seen.index_select(0, rows.slots)
        factor = rows.repetition[:, None]
        penalised = torch.where(scores > 0, scores / factor, scores * factor)
        scores = torch.where(seen, penalised, scores)
    if rows.any_generated_penalty:
        assert rows.counts is not None
        counts = rows.counts.index_select(0, rows.slots)
        penalty = rows.frequency[:, None] * counts + rows.presence[:, None] * (counts > 0)
        scores = scores - penalty
    return scores


def _penalise_seen(scores: torch.Tensor, rows: StepRows) -> torch.Tensor:
    """``_penalise``'s values, computed on the tokens each row has seen only (its prompt and
    what it generated: every generated token has been seen, as a step's input, by the time
    the next is sampled): found with one ``nonzero`` the host reads, a few hundred entries a
    row instead of passes over the vocabulary. In place."""
    if not (rows.any_repetition or rows.any_generated_penalty):
        return scores
    assert rows.seen is not None and rows.counts is not None
    row, token = rows.seen.index_select(0, rows.slots).nonzero(as_tuple=True)
    values = scores[row, token]
    if rows.any_repetition:
        factor = rows.repetition[row]
        values = torch.where(values > 0, values / factor, values * factor)
    if rows.any_generated_penalty:
        counts = rows.counts[rows.slots[row], token]
        values = values - (rows.frequency[row] * counts + rows.presence[row] * (counts > 0))
    scores[row, token] = values
    return scores


# ---- 4: thresholds ---------------------------------------------------------------------------


@dataclass
class _Chosen:
    """What the filters and the draw decided: each row's token, its threshold (0: every
    token kept), the mass its kept tokens hold (of the tempered distribution), and its most
    likely tokens (ids, probabilities: sorted, most likely first), for the logprobs."""

    drawn: torch.Tensor  # (R,)
    threshold: torch.Tensor  # (R,) float32
    kept_mass: torch.Tensor  # (R,) float32
    top_ids: torch.Tensor  # (R, M)
    top_probs: torch.Tensor  # (R, M)


def sorted_thresholds(sorted_probs: torch.Tensor, rows: StepRows) -> torch.Tensor:
    """Each row's probability threshold from its M most likely probabilities (R, M), most
    likely first: the largest of its top-k, top-p and min-p thresholds (0 for a greedy row
    or one with no filter). Exact when the threshold lies above the M-th value (or M is the
    whole vocabulary)."""
    m = sorted_probs.shape[1]
    k = rows.top_k.clamp(max=m)
    kth = sorted_probs.gather(1, (k.clamp(min=1) - 1)[:, None])[:, 0]
    zero = torch.zeros_like(kth)
    threshold = torch.where(k > 0, kth, zero)
    if rows.any_top_p:
        # Top-p over what top-k kept: its mass, then the prefix before which less than
        # top_p of it lies; the threshold is that prefix's last value (its ties kept).
        kept = sorted_probs * (sorted_probs >= threshold[:, None])
        mass = torch.where(k > 0, _row_sums(kept), torch.ones_like(kth))
        total = sorted_probs.cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(total[:, :1]), total[:, :-1]], dim=1)
        inside = (before < (rows.top_p * mass)[:, None]).sum(dim=-1).clamp(min=1)
        last = sorted_probs.gather(1, (inside - 1)[:, None])[:, 0]
        threshold = torch.maximum(threshold, torch.where(rows.top_p < 1.0, last, zero))
    threshold = torch.maximum(threshold, rows.min_p * sorted_probs[:, 0])
    return threshold.masked_fill(rows.greedy, 0.0)


def nucleus_threshold(probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The top-p threshold of each row of ``probs`` (F, V) without sorting it: the smallest
    probability p such that the tokens more likely than p hold less than ``mass`` (F,).
    CPU only (it reads sizes on the host). A radix select: the mass of every value of the
    float's high 16 bits (a histogram), the bucket where the mass above first reaches
    ``mass``, then a sort of that bucket's tokens alone."""
    rows = probs.shape[0]
    bits = probs.view(torch.int32)  # probabilities are >= 0: their bits sort as they do
    high = (bits >> 16).long()
    histogram = torch.zeros((rows, 1 << 15), dtype=probs.dtype).scatter_add_(1, high, probs)
    at_or_above = histogram.flip(-1).cumsum(dim=-1).flip(-1)
    above = torch.cat([at_or_above[:, 1:], torch.zeros_like(at_or_above[:, :1])], dim=1)
    # The mass above a bucket falls as the bucket rises: the first bucket where it is below
    # ``mass`` holds the threshold (and is not empty).
    bucket = (above >= mass[:, None]).sum(dim=-1)
    base = above.gather(1, bucket[:, None])[:, 0].double()
    row, column = (high == bucket[:, None]).nonzero(as_tuple=True)  # row-major: rows ascend
    values = probs[row, column]
    # Within each row, most likely first: rows ascending, then bits descending.
    order = torch.argsort(row * (1 << 31) + ((1 << 31) - 1 - bits[row, column]))
    row, values = row[order], values[order]
    running = values.double().cumsum(dim=0)
    before = running - values.double()
    sizes = torch.bincount(row, minlength=rows)
    starts = sizes.cumsum(dim=0) - sizes
    before = before - before[starts][row] + base[row]  # the mass above each, in its row
    inside = torch.bincount(row, weights=(before < mass.double()[row]).double(), minlength=rows)
    if not values.numel():  # only when every row's mass rounds past its whole sum
        return torch.zeros_like(mass)
    last = values[(starts + inside.long() - 1).clamp(min=0)]
    # A bucket can be empty only at the bottom (mass rounded past the whole sum): keep all.
    return torch.where(sizes > 0, last, 0.0)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums along the last axis in a fixed order per row (a running sum), so that a row's sum
    does not depend on how many rows there are (``sum`` splits a lone long row across
    threads)."""
    return x.cumsum(dim=-1)[:, -1]


# ---- 5: the draw -----------------------------------------------------------------------------


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``weights`` (n, M) (>= 0, not all 0), the first position where the
    running sum reaches ``u`` (n,) times the total; and the total."""
    # In float64: a flat distribution's boundaries (2e-5 apart over 50k tokens) would sit
    # a float32 step (6e-8 near 1) from the target often enough for the logits' last bits
    # (which differ with the batch's size: its matmuls' summation order) to change a token.
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1]
    position = torch.searchsorted(cdf, (u * total)[:, None])[:, 0]
    return position.clamp_(max=weights.shape[1] - 1), total.float()


def _draw_from_vocabulary(
    probs: torch.Tensor, threshold: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens drawn from each row's probabilities at or above its threshold, in vocabulary
    order; and the mass kept."""
    return _inverse_cdf(probs * (probs >= threshold[:, None]), u)


def _draw_from_candidates(
    top_probs: torch.Tensor, top_ids: torch.Tensor, threshold: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same draw when every kept token is a candidate: the kept candidates put back in
    vocabulary order, so the running sum adds the same numbers in the same order as the
    draw over the vocabulary (the tokens in between add zeros)."""
    kept = top_probs >= threshold[:, None]
    vocabulary_order = torch.where(kept, top_ids, torch.iinfo(top_ids.dtype).max).argsort(dim=-1)
    weights = (top_probs * kept).gather(1, vocabulary_order)
    position, total = _inverse_cdf(weights, u)
    ids = top_ids.gather(1, vocabulary_order)
    return ids.gather(1, position[:, None])[:, 0], total


def _choose_by_candidates(probs: torch.Tensor, rows: StepRows) -> _Chosen:
    vocabulary = probs.shape[1]
    count = min(vocabulary, max(CANDIDATES, min(rows.max_top_k, MAX_CANDIDATES)) + 1)
    if not rows.any_filter and rows.max_logprobs is None:
        # Plain temperature: every token kept, one pass over the vocabulary.
        zero = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
        drawn, mass = _draw_from_vocabulary(probs, zero, rows.uniform)
        return _Chosen(drawn, zero, mass, drawn[:, None], zero[:, None])
    top = torch.topk(probs, count, dim=-1)
    threshold = sorted_thresholds(top.values, rows)
    drawn, mass = _draw_from_candidates(top.values, top.indices, threshold, rows.uniform)
    mass = mass.masked_fill(rows.greedy, 1.0)  # a greedy row keeps the whole distribution
    if count == vocabulary:
        return _Chosen(drawn, threshold, mass, top.indices, top.values)
    # A row is settled by its candidates when its threshold drops the last of them (then
    # every other token too), and its top-k fitted. The others, sampling rows only, take
    # the exact pass.
    settled = (threshold > top.values[:, -1]) & (rows.top_k < count)
    exact = (~settled & ~rows.greedy).nonzero()[:, 0]  # CPU: the host reads it at no cost
    if exact.numel():
        every = exact.numel() == probs.shape[0]  # a flat model's nucleus load: all of them
        subset = rows if every else _select(rows, exact)
        p = probs if every else probs.index_select(0, exact)
        threshold_exact = _exact_thresholds(p, top.values.index_select(0, exact), subset)
        drawn_exact, mass_exact = _draw_from_vocabulary(p, threshold_exact, subset.uniform)
        drawn = drawn.index_copy(0, exact, drawn_exact)
        threshold = threshold.index_copy(0, exact, threshold_exact)
        mass = mass.index_copy(0, exact, mass_exact)
    return _Chosen(drawn, threshold, mass, top.indices, top.values)


def _exact_thresholds(probs: torch.Tensor, top: torch.Tensor, rows: StepRows) -> torch.Tensor:
    """``sorted_thresholds`` over the whole vocabulary for rows its candidates could not
    settle: top-k from a larger ``topk`` when it asks more than the candidates, top-p by
    ``nucleus_threshold``, min-p from the most likely probability."""
    m = top.shape[1]
    k = rows.top_k
    zero = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
    largest_k = int(k.max())
    if largest_k >= m:  # more than the candidates: a larger topk, these rows only
        top = torch.topk(probs, min(largest_k, probs.shape[1]), dim=-1).values
    kth = top.gather(1, (k.clamp(min=1, max=top.shape[1]) - 1)[:, None])[:, 0]
    threshold = torch.where(k > 0, kth, zero)
    nucleus = (rows.top_p < 1.0).nonzero()[:, 0]
    if nucleus.numel():
        kept = probs.index_select(0, nucleus)
        mass = rows.top_p.index_select(0, nucleus)
        if largest_k:  # top-p over what top-k kept: that mass (none of this without top-k)
            kept = kept * (kept >= threshold.index_select(0, nucleus)[:, None])
            has_k = k.index_select(0, nucleus) > 0
            mass = mass * torch.where(has_k, _row_sums(kept), 1.0)
        last = nucleus_threshold(kept, mass)
        threshold = threshold.index_copy(
            0, nucleus, torch.maximum(threshold.index_select(0, nucleus), last)
        )
    return torch.maximum(threshold, rows.min_p * top[:, 0])


def _choose_by_sorting(probs: torch.Tensor, rows: StepRows) -> _Chosen:
    ordered = torch.sort(probs, dim=-1, descending=True)
    threshold = sorted_thresholds(ordered.values, rows)
    drawn, mass = _draw_from_vocabulary(probs, threshold, rows.uniform)
    return _Chosen(drawn, threshold, mass, ordered.indices, ordered.values)


# StepRows' per-row tensors (the others are tables, host facts and grammar inputs).
_PER_ROW = (
    "slots", "greedy", "temperature", "top_k", "top_p", "min_p", "uniform", "repetition",
    "presence", "frequency", "suppressing", "biased",
)  # fmt: skip


def _select(rows: StepRows, index: torch.Tensor) -> StepRows:
    """The settings of some of the rows (the tables stay whole)."""
    per_row = {name: getattr(rows, name).index_select(0, index) for name in _PER_ROW}
    return dataclasses.replace(rows, rows=int(index.numel()), **per_row)


# ---- 6: logprobs -----------------------------------------------------------------------------


def _with_logprobs(tokens: torch.Tensor, probs: torch.Tensor, chosen: _Chosen, n: int) -> Sampled:
    """Each row's token with its logprob and its ``n`` most likely alternatives, of the kept
    tokens' distribution (the tempered probabilities over the kept mass; -inf outside)."""
    log_mass = chosen.kept_mass.log()[:, None]
    chosen_p = probs.gather(1, tokens[:, None])
    kept = chosen_p >= chosen.threshold[:, None]
    logprob = torch.where(kept, chosen_p.log() - log_mass, float("-inf"))[:, 0]
    width = max(n, 1)
    top_probs, top_ids = chosen.top_probs[:, :width], chosen.top_ids[:, :width]
    if top_probs.shape[1] < width:  # a vocabulary smaller than n: pad with nothing kept
        pad = width - top_probs.shape[1]
        top_probs = torch.nn.functional.pad(top_probs, (0, pad))
        top_ids = torch.nn.functional.pad(top_ids, (0, pad))
    top_kept = top_probs >= chosen.threshold[:, None]
    top_logprobs = torch.where(top_kept, top_probs.log() - log_mass, float("-inf"))
    return Sampled(tokens, logprob, top_ids[:, :n], top_logprobs[:, :n])
