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
  batched sampler (``sampling.py``) from the batch's slot tables (``sampling_slots.py``,
  the continuous runner's too: row i of the batch is slot i), and leaves a one-hot score that
  the call's greedy argmax then picks. Its tokens and logprobs reach the host in the one copy
  per step that ``_RowSteps`` makes.

A row that ran in a batch that failed keeps its tokens: run again, it continues after them
(its prompt is its prompt plus those tokens), so a retried stream never repeats a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from lmserve_server.engine.faults import out_of_memory
from lmserve_server.engine.rows import Row
from lmserve_server.engine.sampling import StepRows, sample, unpack
from lmserve_server.engine.sampling_slots import SamplingSlots
from lmserve_server.engine.types import GenerationOutput

if TYPE_CHECKING:
    from lmserve_server.grammar.bitmask import BitmaskApplier


def generate_batch(
    model: Any,
    rows: Sequence[Row],
    *,
    pad_token_id: int,
    device: torch.device,
    vocab: int,
    end_token_ids: frozenset[int],
) -> list[GenerationOutput | Exception]:
    """Runs the rows that still need tokens through one ``generate``; returns each row's
    outcome: its output, or the error it was stopped with."""
    running = [r for r in rows if not r.done]
    if running:
        _generate(model, running, pad_token_id, device, vocab, end_token_ids)
    return [r.error if r.error is not None else r.output() for r in rows]


def _generate(
    model: Any,
    rows: Sequence[Row],
    pad_token_id: int,
    device: torch.device,
    vocab: int,
    end_token_ids: frozenset[int],
) -> None:
    prompts = [(*r.request.prompt_ids, *r.tokens) for r in rows]  # a retry continues
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    sampler = None
    if any(r.request.needs_sampler for r in rows):
        slots = SamplingSlots(len(rows), vocab, device, end_token_ids)
        for slot, row in enumerate(rows):
            slots.admit(slot, row.request, row.seed, row.tokens)
        sampler = _RowSampling(slots, attention_mask, rows)
    steps = _RowSteps(rows, sampler)
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
        raise out_of_memory(
            err,
            f"for {len(rows)} row(s) of up to {input_ids.shape[1]} prompt "
            f"+ {config.max_new_tokens} new tokens",
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

    def __init__(self, rows: Sequence[Row], sampler: _RowSampling | None) -> None:
        self._rows = rows
        self._sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self._sampler is None:
            tokens = input_ids[:, -1].tolist()
            done = [row.accept(token) for row, token in zip(self._rows, tokens, strict=True)]
        else:
            done = []
            for row, values in zip(self._rows, self._sampler.chosen(), strict=True):
                token, logprob = unpack(values, row.request.logprobs)
                done.append(row.accept(token, logprob))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _RowSampling(LogitsProcessor):
    """Draws every row's next token with its own settings; leaves a one-hot score."""

    def __init__(
        self, slots: SamplingSlots, attention_mask: torch.Tensor, rows: Sequence[Row]
    ) -> None:
        self._slots = slots
        self._rows = rows
        self._masks: tuple[torch.Tensor, BitmaskApplier] | None = None
        self._slot_list = list(range(slots.slots))
        self._on_device = torch.arange(slots.slots, device=slots.device)
        self._prompt: torch.Tensor | None = attention_mask
        self._packed: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        slots = self._slots
        if self._prompt is not None:  # the first step: every prompt token has been seen
            which, columns = self._prompt.nonzero(as_tuple=True)
            slots.mark_seen(which, input_ids[which, columns])
            self._prompt = None
        else:
            slots.mark_seen(self._on_device, input_ids[:, -1])
        slots.upload()
        step = slots.rows(self._slot_list, self._on_device)
        self._constrain(step)
        chosen = sample(scores, step, device_only=slots.device.type == "cuda")
        slots.count(self._on_device, chosen.tokens)
        slots.advance(self._slot_list)
        self._packed = chosen.packed()
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, chosen.tokens[:, None], 0.0)  # type: ignore[return-value]

    def _constrain(self, rows: StepRows) -> None:
        """The masks of the rows under a grammar (structured output) that are still going."""
        constrained = [
            (i, row.matcher)
            for i, row in enumerate(self._rows)
            if row.matcher is not None and not row.done
        ]
        if not constrained:
            return
        from lmserve_server.grammar.bitmask import BitmaskApplier, allocate_bitmask
        from lmserve_server.grammar.matcher import fill_bitmasks

        if self._masks is None:
            vocab = constrained[0][1].vocab_size
            applier = BitmaskApplier(self._slots.device, torch.float32)
            self._masks = (allocate_bitmask(len(self._rows), vocab), applier)
        buffer, applier = self._masks
        masks = buffer[: len(constrained)]
        fill_bitmasks([(matcher, n) for n, (_, matcher) in enumerate(constrained)], masks)
        device = self._slots.device
        rows.grammar_rows = torch.tensor([i for i, _ in constrained], device=device)
        rows.grammar_masks = masks.to(device)
        rows.grammar_applier = applier

    def chosen(self) -> list[list[float]]:
        """The last step's tokens (and logprobs), each row's ``Sampled.packed()`` row: the
        step's one copy to the host."""
        assert self._packed is not None
        return list(self._packed.tolist())
