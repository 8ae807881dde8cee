"""Per-row hooks into one batched ``generate`` call: each row keeps its own limit, stop
strings, sampling settings, random generator, token stream and cancellation.

``generate`` knows one set of settings per call. These hooks make a batch of unlike
requests behave, row by row, as if each ran alone:

- ``RowStopping`` (a StoppingCriteria) ends a row at its own ``max_new_tokens``, at its stop
  strings, or when its caller has gone away; ``generate`` returns once every row has ended.
- ``RowSampler`` (a LogitsProcessor) samples the next token of each sampling row with that
  row's temperature/top-k/top-p and its own ``torch.Generator``, and leaves a one-hot score
  that the call's greedy argmax then picks; greedy rows pass through untouched. A seeded
  row's tokens so depend on its own seed and logits alone, not on its neighbours.
- ``RowStreamer`` hands each row's new tokens to its request's ``on_token`` callback.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from lmserve_server.types import GenerationRequest, SamplingParams


class RowStopping(StoppingCriteria):
    """Marks each row finished at its own limit, its stop strings, or its caller's cancel.

    ``generate`` then pads finished rows (pad == eos) until every row is done; the engine
    cuts each row back afterwards.
    """

    def __init__(
        self,
        prompt_len: int,
        requests: Sequence[GenerationRequest],
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
    ) -> None:
        self._prompt_len = prompt_len
        self._limits = torch.tensor([r.max_new_tokens for r in requests], device=device)  # (B,)
        self._stops = [(i, r.stop) for i, r in enumerate(requests) if r.stop]
        self._controls = [(i, r.control) for i, r in enumerate(requests) if r.control]
        self._tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self._prompt_len
        done = self._limits <= generated  # (B,)
        for row, control in self._controls:
            if control.cancelled:
                done[row] = True
        for row, stops in self._stops:
            if not done[row]:
                row_tokens = input_ids[row, self._prompt_len :].tolist()
                done[row] = shows_stop(row_tokens, stops, self._tokenizer)
        return done  # type: ignore[return-value]


def shows_stop(
    generated: Sequence[int], stops: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> bool:
    """Whether the end of a row's generated tokens shows one of its stop strings."""
    # A stop string spans at most as many tokens as it has bytes.
    tail = generated[-max(len(s.encode()) for s in stops) :]
    text = tokenizer.decode(list(tail), skip_special_tokens=True)
    return any(s in text for s in stops)


class RowSampler(LogitsProcessor):
    """Samples sampling rows with their own settings; greedy rows are left to argmax."""

    def __init__(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        self._rows = [
            (i, r.sampling, row_generator(r.sampling, device))
            for i, r in enumerate(requests)
            if not r.sampling.greedy
        ]

    @property
    def active(self) -> bool:
        return bool(self._rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, params, generator in self._rows:
            token = sample(scores[row], params, generator)  # (1,)
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """One token id (1,) drawn from a row's logits (V,) with its own settings and generator."""
    return torch.multinomial(_filtered_probs(logits, params), 1, generator=generator)


def row_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next-token probabilities after temperature, top-k and top-p (nucleus) filtering."""
    # Shift by the max first: a tiny temperature then gives a one-hot, never inf - inf = NaN.
    logits = (logits.float() - logits.max()) / params.temperature  # (V,)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


class RowStreamer(BaseStreamer):
    """Fans each decode step's tokens (B,) out to the rows' ``on_token`` callbacks.

    A row's stream ends at its EOS, at its limit, or when it was marked finished (after
    which ``generate`` feeds it pad == eos tokens), so no callback sees a token past its end.
    """

    def __init__(self, requests: Sequence[GenerationRequest], eos_token_id: int) -> None:
        self._sinks = [
            (i, r.control.on_token, r.max_new_tokens)
            for i, r in enumerate(requests)
            if r.control and r.control.on_token
        ]
        self._eos = eos_token_id
        self._counts = [0] * len(requests)
        self._done = [False] * len(requests)
        self._prompt_seen = False

    @property
    def active(self) -> bool:
        return bool(self._sinks)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt ids (B, T)
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()  # (B,)
        for row, on_token, limit in self._sinks:
            if self._done[row]:
                continue
            token = tokens[row]
            if token == self._eos:
                self._done[row] = True
                continue
            on_token(token)
            self._counts[row] += 1
            self._done[row] = self._counts[row] >= limit

    def end(self) -> None:
        pass
