"""Iteration-level ("continuous") batching: one decode step at a time over a running batch
that rows join and leave between steps. Synchronous and model-side; ``scheduler.py`` runs it
on a thread and talks to asyncio.

The running batch is left-aligned like a static batch: every row's KV cache is padded on the
left to a common length and an attention mask hides the pads, so the model's forward is the
same as ``generate``'s. Between steps:

- joining rows are prefilled together (one left-padded forward), and their caches are padded
  to the running batch's length and concatenated to it;
- finished rows (EOS, their own max_new_tokens, a stop string, a cancelled caller) leave at
  once (``batch_select_indices``), and the columns that have become padding for every row
  are cut off, so nobody pays for a row that is gone.

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
from lmserve_server.types import GenerationOutput, GenerationRequest


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far (EOS included)
    ticket: Any = None  # the scheduler's handle for the row's caller


class DecodeBatch:
    """The running batch. ``admit`` prefills new rows; ``step`` decodes one token for every
    row and returns the rows that finished. Not thread-safe: one thread drives it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._model: Any = engine.model
        self._device = engine.input_device
        self._eos = engine.eos_token_id
        self.rows: list[Row] = []
        self._cache: Any = None  # a DynamicCache while rows run
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)  # (B, L)
        self._last = torch.zeros((0,), dtype=torch.long, device=self._device)  # (B,)
        # transformers 5.x renames forward's past_key_values to cache; take what it has.
        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def padded_tokens(self) -> int:
        """Rows x cached length: what the batch holds in its KV cache now."""
        return self._mask.shape[0] * self._mask.shape[1]

    def admit(self, rows: Sequence[Row]) -> list[Row]:
        """Prefills ``rows`` in one forward, picks each one's first token and adds them to
        the running batch. Returns the rows that are already finished."""
        prompts = [r.request.prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor(
            [[self._eos] * (width - len(p)) + list(p) for p in prompts], device=self._device
        )  # (N, T)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self._device
        )  # (N, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
        cache = DynamicCache(config=self._model.config)
        logits = self._forward(ids, mask, positions, cache)  # (N, V)
        for row in rows:
            if not row.request.sampling.greedy:
                row.generator = row_generator(row.request.sampling, self._device)
        first = self._pick(logits, rows)  # (N,)
        self._join(rows, cache, mask, first)
        return self._collect(first.tolist(), rows)

    def step(self) -> list[Row]:
        """One decode step for every running row; returns the rows that finished."""
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True) - 1  # (B, 1)
        logits = self._forward(self._last[:, None], self._mask, positions, self._cache)
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

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        with torch.inference_mode():
            out = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: cache},
            )
        return out.logits[:, -1].float()  # (B, V)

    def _pick(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """Greedy argmax for every row, then each sampling row draws with its own settings."""
        picked = logits.argmax(dim=-1)  # (B,)
        for i, row in enumerate(rows):
            if row.generator is not None:
                picked[i] = sample(logits[i], row.request.sampling, row.generator)[0]
        return picked

    def _join(
        self, rows: Sequence[Row], cache: Any, mask: torch.Tensor, first: torch.Tensor
    ) -> None:
        if self._cache is None or not self.rows:
            self._cache, self._mask, self._last = cache, mask, first
            self.rows = list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = [
            (
                torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)]),
                torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)]),
            )
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]  # each (B + N, H, L, D)
        self._cache = DynamicCache(ddp_cache_data=layers, config=self._model.config)
        self._mask = torch.cat([_pad_left_2d(self._mask, width), _pad_left_2d(mask, width)])
        self._last = torch.cat([self._last, first])
        self.rows += rows

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
        keep = [i for i, row in enumerate(self.rows) if row not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._last = self._last[:0]
            return
        index = torch.tensor(keep, device=self._device)
        self._cache.batch_select_indices(index)
        self._mask, self._last = self._mask[index], self._last[index]
        # Columns that are now padding for every row cost every step: cut them.
        start = int(self._mask.argmax(dim=1).min())  # first real column of the longest row
        if start:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self._mask = self._mask[:, start:]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, width, D) with zeros on the left."""
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))


def _pad_left_2d(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
