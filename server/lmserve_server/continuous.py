"""Iteration-level ("continuous") batching: one decode step at a time over a running batch
that rows join and leave between steps. Synchronous and model-side; ``scheduler.py`` runs it
on a thread and talks to asyncio.

The running batch's KV cache is a ``SlotCache`` (``slots.py``): preallocated buffers that a
decode step writes in place, one slot per row, one shared write column, each row masked to
its own columns. Between steps:

- joining rows are prefilled in groups of similar prompt length (one left-padded forward per
  group, logits for the last position only) and their keys and values are written into free
  slots;
- finished rows (EOS, their own max_new_tokens, a stop string, a cancelled caller) leave at
  once: the last row moves into the freed slot, and the attended window starts at the oldest
  remaining row's first column, so nobody pays for a row that is gone.

Each row keeps its own settings, as in the static engine: its own sampler and random
generator (``rows.sample``), stop strings, stream callback and position ids.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from lmserve_server.engine import Engine
from lmserve_server.rows import row_generator, sample, shows_stop
from lmserve_server.slots import SlotCache
from lmserve_server.types import GenerationOutput, GenerationRequest

# Padding a prefill group may add this share of its real tokens before a new group starts.
PREFILL_WASTE = 0.25


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far (EOS included)
    ticket: Any = None  # the scheduler's handle for the row's caller


class DecodeBatch:
    """The running batch. ``admit`` prefills new rows; ``step`` decodes one token for every
    row and returns the rows that finished. Not thread-safe: one thread drives it."""

    def __init__(
        self, engine: Engine, *, max_rows: int = 0, prefill_waste: float = PREFILL_WASTE
    ) -> None:
        self._engine = engine
        self._model: Any = engine.model
        self._device = engine.input_device
        self._eos = engine.eos_token_id
        self._prefill_waste = prefill_waste
        self.rows: list[Row] = []  # row i lives in cache slot i
        config = self._model.config.get_text_config()
        self._cache = SlotCache(int(config.num_hidden_layers), self._device, max_rows)
        self._last = torch.zeros((0,), dtype=torch.long, device=self._device)  # (B,)
        # transformers 5.x renames forward's past_key_values to cache; take what it has.
        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # Prefill needs the last position's logits only; the LM head on every prompt
        # position would cost a third of the prefill on GPT-2.
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        attention = getattr(self._model.config, "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            raise ValueError(
                f"--scheduler continuous needs sdpa or eager attention, not {attention!r}"
            )
        self._boolean_mask = attention == "sdpa"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def padded_tokens(self) -> int:
        """Rows x attended columns: what a decode step reads of the KV cache now."""
        return len(self.rows) * self._cache.window

    def admit(self, rows: Sequence[Row]) -> list[Row]:
        """Prefills ``rows`` (in groups of alike length), picks each one's first token and
        adds them to the running batch. Returns the rows that are already finished."""
        finished = []
        for group in prefill_groups(rows, self._prefill_waste):
            finished += self._admit_group(group)
        return finished

    def step(self) -> list[Row]:
        """One decode step for every running row; returns the rows that finished."""
        mask, positions = self._cache.step_inputs()  # (B, 1, 1, W+1), (B, 1)
        logits = self._forward(self._last[:, None], self._attention(mask), positions, self._cache)
        self._cache.advance()
        self._last = self._pick(logits, self.rows)  # (B,)
        return self._collect(self._last.tolist(), self.rows)

    def drop_cancelled(self) -> list[Row]:
        """Removes rows whose caller has gone away; returns them."""
        gone = [r for r in self.rows if r.request.control and r.request.control.cancelled]
        if gone:
            self._remove(gone)
        return gone

    def finish(self, row: Row) -> GenerationOutput:
        return self._engine.finish_row(row.tokens, row.request)

    # ---- the steps' parts -------------------------------------------------------------------

    def _admit_group(self, rows: Sequence[Row]) -> list[Row]:
        prompts = [r.request.prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor(
            [[self._eos] * (width - len(p)) + list(p) for p in prompts], device=self._device
        )  # (N, T)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self._device
        )  # (N, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
        prefilled: Any = DynamicCache(config=self._model.config)
        logits = self._forward(ids, mask, positions, prefilled, **self._last_logits_only)
        for row in rows:
            if not row.request.sampling.greedy:
                row.generator = row_generator(row.request.sampling, self._device)
        first = self._pick(logits, rows)  # (N,)
        layers = [(layer.keys, layer.values) for layer in prefilled.layers]
        self._cache.join(layers, [len(p) for p in prompts])
        self.rows += rows
        self._last = torch.cat([self._last, first])
        return self._collect(first.tolist(), rows)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        **extra: Any,
    ) -> torch.Tensor:
        with torch.inference_mode():
            out = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: cache},
                **extra,
            )
        return out.logits[:, -1].float()  # (B, V)

    def _attention(self, allowed: torch.Tensor) -> torch.Tensor:
        """A 4D mask as the model's attention wants it: boolean for sdpa, additive for eager."""
        if self._boolean_mask:
            return allowed
        blocked = torch.finfo(self._model.dtype).min
        return torch.zeros(allowed.shape, dtype=self._model.dtype, device=self._device).masked_fill(
            ~allowed, blocked
        )

    def _pick(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """Greedy argmax for every row, then each sampling row draws with its own settings."""
        picked = logits.argmax(dim=-1)  # (B,)
        for i, row in enumerate(rows):
            if row.generator is not None:
                picked[i] = sample(logits[i], row.request.sampling, row.generator)[0]
        return picked

    def _collect(self, tokens: list[int], rows: Sequence[Row]) -> list[Row]:
        """Appends each row's new token, streams it, and removes the rows that are done."""
        done = []
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
            request = row.request
            if token != self._eos and request.control and request.control.on_token:
                request.control.on_token(token)
            if (
                token == self._eos
                or len(row.tokens) >= request.max_new_tokens
                or (request.stop and shows_stop(row.tokens, request.stop, self._engine.tokenizer))
            ):
                done.append(row)
        if done:
            self._remove(done)
        return done

    def _remove(self, gone: Sequence[Row]) -> None:
        slots = [i for i, row in enumerate(self.rows) if row in gone]
        order = self._cache.remove(slots)
        self.rows = [self.rows[i] for i in order]
        self._last = self._last[torch.tensor(order, dtype=torch.long, device=self._device)]


def prefill_groups(rows: Sequence[Row], waste: float) -> list[list[Row]]:
    """Rows by prompt length, longest first, cut into groups whose padding stays within
    ``waste`` of their real tokens: padding a 10-token prompt to 150 would cost more than
    a forward of its own."""
    ordered = sorted(rows, key=lambda r: len(r.request.prompt_ids), reverse=True)
    groups: list[list[Row]] = []
    real = 0
    for row in ordered:
        length = len(row.request.prompt_ids)
        if groups:
            width = len(groups[-1][0].request.prompt_ids)
            if width * (len(groups[-1]) + 1) <= (1 + waste) * (real + length):
                groups[-1].append(row)
                real += length
                continue
        groups.append([row])
        real = length
    return groups
