"""``SamplingSlots``: every slot's sampling settings and token history, written once when a
request takes the slot and kept up to date as its tokens come (vLLM's ``InputBatch``).

A step's sampler reads its rows' settings by slot (``rows``) instead of having them rebuilt
from the requests every step:

- a table of scalars per slot (temperature, top-k/p, min-p, penalties, the seed's hash, the
  tokens generated so far, ``min_new_tokens``, logprobs), kept on the host (pinned on a GPU)
  and copied to the device with the step's inputs: the continuous runner places it at the
  head of its one upload (``host``/``on_device``), the static engine ``upload``s it;
- what penalties read, on the device, allocated when the first request that needs them
  arrives: every token a slot's row has seen (``mark_seen``, from the step's own inputs:
  its prompt as it is prefilled, then each token it generated) and how often it generated
  each token (``count``, from the sampled tokens, without a trip through the host);
- each slot's logit bias, and the tokens it suppresses under ``min_new_tokens`` (its end
  tokens), written at admission.

The host's copy also answers, for a step, which features any of its rows use, so that the
sampler skips the others without reading the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmserve_server.engine.sampling import StepRows, seed_hash, uniform_tensor
from lmserve_server.engine.types import GenerationRequest

# The table's columns: floats are stored as float64 bits in the int64 table.
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY = range(6)
_TOP_K, _SEED_HASH, _COUNTER, _MIN_NEW_TOKENS, _LOGPROBS, _BIASED, _GREEDY = range(6, 13)
COLUMNS = 13
_NEUTRAL_FLOATS = {_TEMPERATURE: 1.0, _TOP_P: 1.0, _MIN_P: 0.0, _REPETITION: 1.0}
_NEUTRAL_INTS = {_LOGPROBS: -1, _GREEDY: 1}


class SamplingSlots:
    """The tables of ``slots`` slots over a vocabulary of ``vocab`` (the logits' width). Not
    thread-safe: the engine thread alone drives it."""

    def __init__(
        self,
        slots: int,
        vocab: int,
        device: torch.device,
        end_token_ids: frozenset[int],
        *,
        host: torch.Tensor | None = None,
        on_device: torch.Tensor | None = None,
    ) -> None:
        size = slots * COLUMNS
        pinned = device.type == "cuda"
        self.slots = slots
        self.vocab = vocab
        self.device = device
        self._end_token_ids = tuple(sorted(end_token_ids))
        if host is None:
            host = torch.zeros(size, dtype=torch.long, pin_memory=pinned)
        if on_device is None:
            on_device = host if device.type == "cpu" else torch.zeros_like(host, device=device)
        if host.numel() != size or on_device.numel() != size:
            raise ValueError(f"a table of {slots} slots takes {size} values")
        self.host, self.on_device = host, on_device
        self._ints = host.numpy().reshape(slots, COLUMNS)  # shares the host tensor's memory
        self._floats = self._ints.view(np.float64)
        for slot in range(slots):
            self._reset(slot)
        self.seen: torch.Tensor | None = None  # (slots, V) bool
        self.counts: torch.Tensor | None = None  # (slots, V) int32
        self.bias_tokens: torch.Tensor | None = None  # (slots, B)
        self.bias_values: torch.Tensor | None = None
        self.suppress_tokens: torch.Tensor | None = None  # (slots, S), -1 padded

    @staticmethod
    def size_of(slots: int) -> int:
        """The table's length in int64 values, for a caller that places it."""
        return slots * COLUMNS

    # ---- writes --------------------------------------------------------------------------------

    def admit(
        self, slot: int, request: GenerationRequest, seed: int, generated: Sequence[int] = ()
    ) -> None:
        """``request`` takes ``slot`` (its row's ``seed``, and the tokens it has generated
        already when it continues after a failed batch)."""
        params = request.sampling
        sampled = not params.greedy
        self._reset(slot)
        floats, ints = self._floats[slot], self._ints[slot]
        floats[_TEMPERATURE] = params.temperature if sampled else 1.0
        ints[_GREEDY] = not sampled
        floats[_TOP_P] = params.top_p if sampled else 1.0
        floats[_MIN_P] = params.min_p if sampled else 0.0
        floats[_REPETITION] = params.repetition_penalty
        floats[_PRESENCE] = params.presence_penalty
        floats[_FREQUENCY] = params.frequency_penalty
        ints[_TOP_K] = params.top_k if sampled else 0
        ints[_SEED_HASH] = seed_hash(seed)
        ints[_COUNTER] = len(generated)
        ints[_MIN_NEW_TOKENS] = request.min_new_tokens
        ints[_LOGPROBS] = -1 if request.logprobs is None else request.logprobs
        ints[_BIASED] = bool(params.logit_bias)
        if params.penalised:
            seen, counts = self._history()
            seen[slot] = False
            counts[slot] = 0
            if generated:
                ids = torch.tensor(list(generated), dtype=torch.long).to(self.device)
                counts[slot].index_put_((ids,), torch.ones_like(ids, dtype=counts.dtype), True)
                seen[slot, ids] = True
        if params.logit_bias:
            tokens, values = zip(*params.logit_bias, strict=True)
            self._write_bias(slot, tokens, values)
        if request.min_new_tokens:
            ends = sorted({*self._end_token_ids, *request.stop_token_ids})
            self._write_suppressed(slot, ends)

    def advance(self, slots: Sequence[int] | np.ndarray) -> None:
        """Each of ``slots`` (distinct) has drawn one more token."""
        self._ints[np.asarray(slots, dtype=np.int64), _COUNTER] += 1

    def mark_seen(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """The rows of ``slots`` have put ``tokens`` through the model (device tensors)."""
        if self.seen is not None:
            self.seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))

    def count(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """The rows of ``slots`` generated ``tokens`` (device tensors, from the sampler)."""
        if self.counts is not None:
            ones = torch.ones_like(tokens, dtype=self.counts.dtype)
            self.counts.index_put_((slots, tokens), ones, accumulate=True)

    def upload(self) -> None:
        """Copies the host table to the device (when they are not the same memory)."""
        if self.on_device.data_ptr() != self.host.data_ptr():
            self.on_device.copy_(self.host, non_blocking=True)

    # ---- reads ---------------------------------------------------------------------------------

    def logprobs(self, slot: int) -> int | None:
        value = int(self._ints[slot, _LOGPROBS])
        return None if value < 0 else value

    def rows(self, slots: Sequence[int] | np.ndarray, on_device: torch.Tensor) -> StepRows:
        """The sampler's view of a step whose rows hold ``slots`` (host), the same slots as
        a device tensor ``on_device``; reads the device table as last copied there."""
        ints = self._ints[np.asarray(slots, dtype=np.int64)]  # (R, COLUMNS), a copy
        floats = ints.view(np.float64)
        sampling = ints[:, _GREEDY] == 0
        top_k, top_p, min_p = ints[:, _TOP_K], floats[:, _TOP_P], floats[:, _MIN_P]
        asked = ints[:, _LOGPROBS]
        table = self.on_device.view(self.slots, COLUMNS).index_select(0, on_device)
        table_floats = table.view(torch.float64)
        return StepRows(
            slots=on_device,
            greedy=table[:, _GREEDY] > 0,
            temperature=table_floats[:, _TEMPERATURE].float(),
            top_k=table[:, _TOP_K],
            top_p=table_floats[:, _TOP_P].float(),
            min_p=table_floats[:, _MIN_P].float(),
            uniform=uniform_tensor(table[:, _SEED_HASH], table[:, _COUNTER]),
            repetition=table_floats[:, _REPETITION].float(),
            presence=table_floats[:, _PRESENCE].float(),
            frequency=table_floats[:, _FREQUENCY].float(),
            suppressing=table[:, _COUNTER] < table[:, _MIN_NEW_TOKENS],
            biased=table[:, _BIASED] > 0,
            seen=self.seen,
            counts=self.counts,
            bias_tokens=self.bias_tokens,
            bias_values=self.bias_values,
            suppress_tokens=self.suppress_tokens,
            rows=len(ints),
            any_sampling=bool(sampling.any()),
            any_filter=bool((sampling & ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0))).any()),
            max_top_k=int(top_k[sampling].max()) if sampling.any() else 0,
            any_top_p=bool((sampling & (top_p < 1.0)).any()),
            any_bias=bool(ints[:, _BIASED].any()),
            any_suppression=bool((ints[:, _COUNTER] < ints[:, _MIN_NEW_TOKENS]).any()),
            any_repetition=bool((floats[:, _REPETITION] != 1.0).any()),
            any_generated_penalty=bool(
                ((floats[:, _PRESENCE] != 0.0) | (floats[:, _FREQUENCY] != 0.0)).any()
            ),
            max_logprobs=int(asked.max()) if (asked >= 0).any() else None,
        )

    # ---- the tables behind --------------------------------------------------------------------

    def _reset(self, slot: int) -> None:
        self._ints[slot] = 0
        for column, value in _NEUTRAL_FLOATS.items():
            self._floats[slot, column] = value
        for column, number in _NEUTRAL_INTS.items():
            self._ints[slot, column] = number

    def _history(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seen is None or self.counts is None:
            shape = (self.slots, self.vocab)
            self.seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        return self.seen, self.counts

    def _write_bias(self, slot: int, tokens: Sequence[int], values: Sequence[float]) -> None:
        width = len(tokens)
        if self.bias_tokens is None or self.bias_tokens.shape[1] < width:
            self.bias_tokens = self._widened(self.bias_tokens, width, 0, torch.long)
            self.bias_values = self._widened(self.bias_values, width, 0, torch.float32)
        assert self.bias_values is not None
        pad = self.bias_tokens.shape[1] - width
        row = torch.tensor([*tokens, *([0] * pad)], dtype=torch.long)
        self.bias_tokens[slot] = row.to(self.device)
        self.bias_values[slot] = torch.tensor([*values, *([0.0] * pad)]).to(self.device)

    def _write_suppressed(self, slot: int, tokens: Sequence[int]) -> None:
        width = len(tokens)
        if self.suppress_tokens is None or self.suppress_tokens.shape[1] < width:
            self.suppress_tokens = self._widened(self.suppress_tokens, width, -1, torch.long)
        pad = self.suppress_tokens.shape[1] - width
        row = torch.tensor([*tokens, *([-1] * pad)], dtype=torch.long)
        self.suppress_tokens[slot] = row.to(self.device)

    def _widened(
        self, table: torch.Tensor | None, width: int, fill: float, dtype: torch.dtype
    ) -> torch.Tensor:
        """``table`` (slots, w) as (slots, max(width, 2w)), the new columns ``fill``."""
        current = 0 if table is None else table.shape[1]
        shape = (self.slots, max(width, 2 * current))
        wider = torch.full(shape, fill, dtype=dtype, device=self.device)
        if table is not None:
            wider[:, :current] = table
        return wider
