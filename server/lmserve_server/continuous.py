"""Iteration-level ("continuous") batching: one step at a time over a running batch that
rows join and leave between steps. Synchronous and model-side; ``scheduler.py`` runs it on
a thread and talks to asyncio.

A step is one forward of the model over a packed sequence: the last token of every running
row and the whole prompt of every joining row (``slots.py`` places them in the KV cache and
gives each its own attention). Every running row gets its next token, every joiner its
first, from the same pass over the weights. After the step, finished rows (EOS, their own
max_new_tokens, a stop string, a cancelled caller) leave at once, and the attended window
starts at the oldest remaining row's first column, so nobody pays for a row that is gone.

Each row keeps its own settings, as in the static engine: its own sampler and random
generator (``rows.sample``), stop strings, stream callback and positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmserve_server.engine import Engine
from lmserve_server.rows import row_generator, sample, shows_stop
from lmserve_server.slots import SlotCache, use_slot_attention
from lmserve_server.types import GenerationOutput, GenerationRequest


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far (EOS included)
    ticket: Any = None  # the scheduler's handle for the row's caller


class DecodeBatch:
    """The running batch. ``step`` runs one forward: a token for every running row and the
    prompt of every joining row; it returns the rows that finished. Not thread-safe: one
    thread drives it."""

    def __init__(self, engine: Engine, *, max_rows: int = 0) -> None:
        self._engine = engine
        self._model: Any = engine.model
        self._device = engine.input_device
        self._eos = engine.eos_token_id
        self.rows: list[Row] = []  # row i lives in cache slot i
        use_slot_attention(self._model)
        config = self._model.config.get_text_config()
        heads = int(config.num_attention_heads)
        self._cache = SlotCache(
            layers=int(config.num_hidden_layers),
            heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            dtype=self._model.dtype,
            device=self._device,
            max_slots=max_rows,
        )
        self._last = torch.zeros((0,), dtype=torch.long, device=self._device)  # (B,)
        # transformers 5.x renames forward's past_key_values to cache; take what it has.
        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def padded_tokens(self) -> int:
        """Rows x attended columns: what a step reads of the KV cache now."""
        return len(self.rows) * self._cache.window

    def step(self, joining: Sequence[Row] = ()) -> list[Row]:
        """One forward: the next token of every running row and the first of every row in
        ``joining`` (prefilled in the same pass). Returns the rows that finished."""
        decoding = len(self.rows)
        prompts = [r.request.prompt_ids for r in joining]
        step, positions = self._cache.begin_step([len(p) for p in prompts])  # (1, S)
        prompt_ids = torch.tensor(
            [t for p in prompts for t in p], dtype=torch.long, device=self._device
        )
        ids = torch.cat([self._last, prompt_ids])  # (S,)
        # Logits only where a next token is picked: each running row, each prompt's end.
        keep = [*range(decoding), *(offset + length - 1 for _, offset, length in step.joins)]
        with torch.inference_mode():
            out = self._model(
                input_ids=ids[None],
                attention_mask=step.mask,  # 4D: transformers passes it on as it is
                position_ids=positions,
                use_cache=True,
                logits_to_keep=torch.tensor(keep, device=self._device),
                slot_step=step,
                **{self._cache_arg: self._cache},
            )
        self._cache.end_step()
        for row in joining:
            if not row.request.sampling.greedy:
                row.generator = row_generator(row.request.sampling, self._device)
        self.rows += joining
        self._last = self._pick(out.logits[0].float(), self.rows)  # (B + N,)
        return self._collect(self._last.tolist(), self.rows)

    def drop_cancelled(self) -> list[Row]:
        """Removes rows whose caller has gone away; returns them."""
        gone = [r for r in self.rows if r.request.control and r.request.control.cancelled]
        if gone:
            self._remove(gone)
        return gone

    def finish(self, row: Row) -> GenerationOutput:
        return self._engine.finish_row(row.tokens, row.request)

    # ---- the step's parts -------------------------------------------------------------------

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
