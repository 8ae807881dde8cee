"""The static scheduler's engine: ONE ``generate`` call per batch of rows.

Rows are left-padded with the EOS token and passed an explicit attention mask: GPT-2 has no
pad token, and with pad == eos a mask inferred from the ids would hide real EOS tokens;
right padding (as GPT-2 tutorials show) would put pad tokens between a prompt and its
continuation. Left padding plus the mask (from which ``generate`` derives position ids)
keeps a row's tokens independent of what it was batched with.

``generate`` knows one set of settings per call; two thin hooks make it serve unlike rows,
both adapters over the engine core:

- ``_RowSteps`` (a StoppingCriteria, called after every new token) hands each row its token
  (``Row.accept``: limits, stop strings and tokens, cancellation, streaming, logprobs) and
  tells ``generate`` which rows have ended; it returns once they all have;
- ``_RowSampling`` (a LogitsProcessor, when a row needs more than a plain argmax: sampling,
  penalties, bias, min_new_tokens, logprobs) draws every row's token at once with the
  batched sampler (``sampling.py``) and leaves a one-hot score that the call's greedy argmax
  then picks.

A row that ran in a batch that failed keeps its tokens: run again, it continues after them
(its prompt is its prompt plus those tokens), so a retried stream never repeats a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from lmserve_server.engine.rows import Row
from lmserve_server.engine.sampling import sample, sampling_tensors, unpack
from lmserve_server.engine.types import GenerationOutput, TokenLogprob
from lmserve_server.errors import OutOfMemoryError


def generate_batch(
    model: Any, rows: Sequence[Row], *, pad_token_id: int, device: torch.device
) -> list[GenerationOutput | Exception]:
    """Runs the rows that still need tokens through one ``generate``; returns each row's
    outcome: its output, or the error it was stopped with."""
    running = [r for r in rows if not r.done]
    if running:
        _generate(model, running, pad_token_id, device)
    return [r.error if r.error is not None else r.output() for r in rows]


def _generate(model: Any, rows: Sequence[Row], pad_token_id: int, device: torch.device) -> None:
    prompts = [(*r.request.prompt_ids, *r.tokens) for r in rows]  # a retry continues
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    sampler = _RowSampling(rows, device) if any(not r.plain_greedy for r in rows) else None
    steps = _RowSteps(rows, device, sampler)
    processors = [sampler] if sampler is not None else []
    config = GenerationConfig(  # nothing from the checkpoint's defaults (penalties, ...)
        max_new_tokens=max(r.request.max_new_tokens - r.generated for r in rows),
        do_sample=False,  # argmax; _RowSampling has already drawn the sampling rows
        pad_token_id=pad_token_id,
    )
    try:
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=[steps],
                logits_processor=processors,
            )
    except torch.OutOfMemoryError as err:
        # Give the cached blocks back before the halves are retried.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"out of device memory for {len(rows)} row(s) of up to {input_ids.shape[1]} prompt "
            f"+ {config.max_new_tokens} new tokens"
        ) from err


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with ``pad_token_id``, and the mask of the real tokens."""
    width = max(len(p) for p in prompts)
    ids = [[pad_token_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(mask, dtype=torch.long, device=device),
    )


class _RowSteps(StoppingCriteria):
    """After each new token: each unfinished row takes its token; ended rows are done."""

    def __init__(
        self, rows: Sequence[Row], device: torch.device, sampler: _RowSampling | None
    ) -> None:
        self._rows = rows
        self._device = device
        self._sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        logprobs = self._sampler.last_logprobs if self._sampler else [None] * len(tokens)
        done = [
            row.accept(token, logprob)
            for row, token, logprob in zip(self._rows, tokens, logprobs, strict=True)
        ]
        return torch.tensor(done, dtype=torch.bool, device=self._device)  # type: ignore[return-value]


class _RowSampling(LogitsProcessor):
    """Draws every row's next token with its own settings; leaves a one-hot score."""

    def __init__(self, rows: Sequence[Row], device: torch.device) -> None:
        self._rows = rows
        self._device = device
        self.last_logprobs: list[TokenLogprob | None] = [None] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        settings = [r.sampling() for r in self._rows]
        chosen = sample(scores, sampling_tensors(settings, self._device))
        if chosen.logprobs is not None:
            self.last_logprobs = [
                unpack(values, s.logprobs)[1]
                for values, s in zip(chosen.packed().tolist(), settings, strict=True)
            ]
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, chosen.tokens[:, None], 0.0)  # type: ignore[return-value]
