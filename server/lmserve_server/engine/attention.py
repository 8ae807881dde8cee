"""The one module that reaches into transformers: a packed step's attention over ``KVCache``.

A continuous step is ONE forward of the model over a packed sequence of tokens: the next
token of every decoding row and a chunk of every prefilling row's prompt, unpadded. The
projections and MLPs don't care which row a token belongs to; only attention does. So the
model is switched to an attention function of ours (``paged_attention``), registered through
transformers' public ``AttentionInterface``; a step hands it a ``StepAttention`` as the
``lmserve_step`` keyword, which the model passes down to every attention call. The function
writes the step's keys and values into the cache at each token's (block, offset), gathers
the blocks the step reads, and gives every part its own attention: decoding rows in runs of
similar lengths (one SDPA call per run, each row read up to its run's longest row:
``plan_decode_runs``), prompt tokens in tiles of fixed positions (``PrefillTile``: one call
per tile). Without ``lmserve_step`` (the
static scheduler's ``generate``) it is transformers' own SDPA, unchanged.

Why prompt tokens go in tiles. CPU SDPA's result for a query row depends, in its last bits,
on the call's shapes: how many queries it has and how many key columns it reads (its
blocking and split of the work follow them). A prompt's chunks depend on the step budget and
on the company (and, with the prefix cache, on where its cached prefix ends), so attention
over "the chunk" would give a prompt's keys and values slightly different bits in different
runs; a cached prefix then would not equal what the row computes without the cache. So every
prompt token at position p is computed in the tile of 32 positions holding p
(``[32k, 32k + 32)``), as a call of exactly 32 queries (the tile's other rows are zeros:
a row's result does not depend on the others') over exactly the columns ``[0, 32k + 32)``
(past p masked: they contribute exact zeros, whatever stale values they hold). The call's
shapes are a function of p alone, so a prompt's keys, values and logits are the same bits
however it is chunked, whatever shares its step, cached or not (tested). It also skips the
causal upper triangle that one masked call over a chunk's whole window computes.

What this relies on in transformers (``>=5.0,<6``), each checked by
``tests/test_transformers_adapter.py`` so that an upgrade that changes one fails there:

- ``AttentionInterface.register`` / ``AttentionMaskInterface.register`` and
  ``model.set_attn_implementation`` (public);
- decoder attention modules call the registered function as ``f(module, query, key, value,
  attention_mask, scaling=..., dropout=..., **kwargs)`` with the forward's extra keyword
  arguments in ``kwargs``, ``query`` (1, H, S, D) and ``key``/``value`` (1, KV, S, D) after
  rotary embeddings, and each module has ``layer_idx`` (and ``sliding_window`` if it has one);
- ``use_cache=False`` leaves keys and values to the attention function alone;
- a 4-D ``attention_mask`` is passed through as it is (so a placeholder skips mask building);
- ``logits_to_keep`` takes a tensor of positions;
- ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` and
  ``transformers.masking_utils.sdpa_mask`` (internal: the SDPA that ``generate`` runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lmserve_server.engine.kv_cache import KVCache
from lmserve_server.engine.prefix_cache import BLOCK

ATTENTION = "lmserve_paged"
STEP_KEYWORD = "lmserve_step"
# Prompt tokens attend in tiles of this many positions (the module's doc says why): one
# block of the KV cache.
TILE = BLOCK


@dataclass(frozen=True)
class PrefillTile:
    """The prompt tokens of one chunk that fall in the tile ``[end - TILE, end)`` of their
    row: one SDPA call of TILE queries over the row's columns ``[0, end)``, which are the
    gathered blocks ``[first_block, first_block + end // BLOCK)`` of the step."""

    first_block: int
    end: int


def prefill_tiles(
    chunks: Sequence[tuple[int, int, int]],
) -> tuple[tuple[PrefillTile, ...], list[int], list[int]]:
    """The tiles of prefill chunks given as (their row's first gathered block, start,
    length), in order: the tiles, and for every token of the chunks (in order) its tile's
    index and its row in the tile."""
    tiles: list[PrefillTile] = []
    tile_of: list[int] = []
    rows: list[int] = []
    for first_block, start, length in chunks:
        first = start // TILE
        for tile in range(first, (start + length - 1) // TILE + 1):
            tiles.append(PrefillTile(first_block, (tile + 1) * TILE))
        base = len(tiles) - 1 - ((start + length - 1) // TILE - first)
        for position in range(start, start + length):
            tile_of.append(base + position // TILE - first)
            rows.append(position % TILE)
    return tuple(tiles), tile_of, rows


@dataclass(frozen=True)
class DecodeRun:
    """Decoding rows attended by one SDPA call: tokens ``[first_token, first_token +
    count)`` of the step, each row ``blocks`` gathered blocks from ``first_block`` on (row
    by row), ``window`` columns (its longest row); ``ragged`` when its rows' lengths
    differ."""

    first_token: int
    count: int
    first_block: int
    blocks: int
    window: int
    ragged: bool


# What one more SDPA call costs in the currency of the plan: key/value columns read by one
# row. A decode step on a CPU reads its keys and values from memory (they are evicted by the
# weights every layer): about 0.7 us per row and column per layer on this project's CPU, and
# a call's fixed cost is about 20 us.
RUN_CALL_COST = 32


def plan_decode_runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Splits decoding rows, sorted by their ``lengths`` (tokens in each row), into runs
    (first row, rows) so that the columns read (each row up to its run's longest), plus
    ``RUN_CALL_COST`` per run, are fewest: rows of a mixed load differ a lot in length, and
    one call over all of them reads every row up to the longest.

    A dynamic programme over at most a batch of rows: with rows sorted, a run's longest
    row is its last, and a run from row i to j costs ``(j - i) * lengths[j - 1]``."""
    n = len(lengths)
    best = [0] * (n + 1)  # best[j]: the cost of the first j rows
    cut = [0] * (n + 1)  # cut[j]: where the last run of the first j rows starts
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        best[j], cut[j] = best[j - 1] + longest + RUN_CALL_COST, j - 1
        for i in range(j - 2, -1, -1):
            cost = best[i] + (j - i) * longest + RUN_CALL_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs = []
    j = n
    while j > 0:
        runs.append((cut[j], j - cut[j]))
        j = cut[j]
    return list(reversed(runs))


@dataclass
class StepAttention:
    """Where one packed forward's S tokens go and what each attends to; built once per step
    on the device from the step's uploaded inputs and used by every layer.

    Each layer first gathers the pool blocks the step reads (``gather``, one index per
    block, row by row: one copy per layer of what the step reads, never a row's context
    kept twice); a row's blocks then read as its keys ``[0, 32 n)`` in place. Tokens ``[0,
    decode_count)`` are single-token rows (decoding, or a one-token prompt) in runs of
    ``decode_runs``, each one SDPA call up to its own longest row (with fixed shapes, for
    captured graphs: one run over the whole bucket). The other tokens are prefill chunks,
    ``prefill_count`` of them, attended in ``prefill_tiles`` (one call per tile: the
    module's doc says why).
    """

    cache: KVCache
    token_blocks: torch.Tensor  # (S,) the block each token's key and value go to
    token_offsets: torch.Tensor  # (S,) and its place in the block
    gather: torch.Tensor  # (G,) the blocks the step reads
    decode_count: int
    decode_runs: tuple[DecodeRun, ...]
    decode_window: int  # the most columns a decoding row reads
    decode_lengths: torch.Tensor  # (decode_count,) tokens in each row after this step
    prefill_count: int  # prefill chunks
    prefill_tiles: tuple[PrefillTile, ...]  # their tiles, chunk by chunk
    prefill_tile_of: torch.Tensor  # (Tp,) the tile of each prefill token
    prefill_tile_rows: torch.Tensor  # (Tp,) its row in the tile (position % TILE)
    _masks: dict[int | None, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict
    )

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """(1, H, S, D) queries -> (1, S, H, D) outputs; writes the step's keys and values."""
        pool_keys, pool_values = self.cache.keys[layer], self.cache.values[layer]
        # Every token's key and value to its own (block, offset): (KV, S, D) each.
        pool_keys[:, self.token_blocks, self.token_offsets] = key[0]
        pool_values[:, self.token_blocks, self.token_offsets] = value[0]
        keys = pool_keys.index_select(1, self.gather)  # (KV, G, BLOCK, D)
        values = pool_values.index_select(1, self.gather)
        decode_mask, prefill_mask = self._masks_for(sliding_window)
        heads, head_dim = query.shape[1], query.shape[3]
        out = query.new_empty((query.shape[2], heads, head_dim))  # (S, H, D)
        d = self.decode_count
        if d and decode_mask is not None:
            q = query[0, :, :d].transpose(0, 1)  # (D, H, D)
            out[:d] = self._attend_decode(q, keys, values, decode_mask, scaling, sliding_window)
        if self.prefill_count:
            q = query[0, :, d:].transpose(0, 1)  # (Tp, H, D)
            tiles = q.new_zeros((len(self.prefill_tiles), heads, TILE, head_dim))
            tiles[self.prefill_tile_of, :, self.prefill_tile_rows] = q
            assert prefill_mask is not None
            widest = prefill_mask.shape[-1]
            outputs = []
            for i, tile in enumerate(self.prefill_tiles):
                blocks = slice(tile.first_block, tile.first_block + tile.end // BLOCK)
                mask = prefill_mask[..., widest - tile.end :]
                outputs.append(
                    _sdpa(
                        tiles[i : i + 1],
                        _rows(keys[:, blocks], 1),
                        _rows(values[:, blocks], 1),
                        mask,
                        scaling,
                    )
                )
            o = torch.cat(outputs)  # (tiles, H, TILE, D)
            out[d:] = o[self.prefill_tile_of, :, self.prefill_tile_rows]
        return out[None]

    def _attend_decode(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """(D, H, head_dim) decoding queries -> their (D, H, head_dim) outputs."""
        out = torch.empty_like(q)
        for run in self.decode_runs:
            tokens = slice(run.first_token, run.first_token + run.count)
            blocks = slice(run.first_block, run.first_block + run.count * run.blocks)
            window = slice(0, run.window)
            # One row, or rows of one length, read exactly their keys: no mask.
            masked = run.ragged or sliding_window is not None
            o = _sdpa(
                q[tokens].unsqueeze(2),
                _rows(keys[:, blocks], run.count)[:, :, window],
                _rows(values[:, blocks], run.count)[:, :, window],
                mask[tokens, :, :, window] if masked else None,
                scaling,
            )
            out[tokens] = o[:, :, 0]
        return out

    def forget_masks(self) -> None:
        """Drops the masks built so far (a captured step is run again over new inputs)."""
        self._masks.clear()

    def _masks_for(
        self, sliding_window: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(decode mask (D, 1, 1, W), prefill tiles' mask (1, 1, TILE, E)): True where a
        query may attend; built once per step and per sliding window."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = (
                self._decode_mask(sliding_window) if self.decode_count else None,
                self._prefill_mask(sliding_window) if self.prefill_count else None,
            )
        return self._masks[sliding_window]

    def _decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        columns = torch.arange(self.decode_window, device=self.decode_lengths.device)
        lengths = self.decode_lengths[:, None]
        mask = columns[None, :] < lengths  # (D, W)
        if sliding_window is not None:
            mask &= columns[None, :] >= lengths - sliding_window
        return mask[:, None, None, :]

    def _prefill_mask(self, sliding_window: int | None) -> torch.Tensor:
        """(1, 1, TILE, E), E the furthest tile end: the tile ending at ``e`` reads its mask
        as the view of the last ``e`` columns (row r of that tile is position e - TILE + r
        and may attend to column c <= that position: the same as c + E - e <= E - TILE + r,
        so one matrix serves every tile)."""
        device = self.prefill_tile_of.device
        widest = max(tile.end for tile in self.prefill_tiles)
        positions = torch.arange(widest - TILE, widest, device=device)[:, None]  # (TILE, 1)
        columns = torch.arange(widest, device=device)[None, :]
        mask = columns <= positions
        if sliding_window is not None:
            mask &= columns > positions - sliding_window
        return mask[None, None]


def _rows(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """(KV, rows x n, BLOCK, D) gathered blocks, row by row -> (rows, KV, n x BLOCK, D):
    a view."""
    heads, _, _, head_dim = blocks.shape
    return blocks.reshape(heads, rows, -1, head_dim).transpose(0, 1)


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """SDPA with grouped-query attention folded into the query axis: (B, H, Q, D) queries
    over (B, KV, W, D) keys. Each key head's query heads become extra query rows, so keys are
    never repeated and any mask (B, 1, Q, W) still applies (repeated for those rows)."""
    batch, heads, length, head_dim = query.shape
    groups = heads // key.shape[1]
    if groups == 1:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling
        )
    folded = query.reshape(batch, key.shape[1], groups * length, head_dim)
    if mask is not None:
        mask = mask.expand(batch, 1, length, mask.shape[-1]).repeat(1, 1, groups, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, scale=scaling
    )
    return o.reshape(batch, heads, length, head_dim)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention of a packed step; transformers' SDPA for any other forward."""
    step: StepAttention | None = kwargs.pop(STEP_KEYWORD, None)
    if step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    window = getattr(module, "sliding_window", None)
    return step.attend(layer, query, key, value, scaling, window), None


def install(model: Any) -> None:
    """Switches ``model`` to ``paged_attention`` (SDPA outside packed steps); idempotent."""
    current = model.config._attn_implementation
    if current == ATTENTION:
        return
    if current != "sdpa":
        raise ValueError(
            f"--scheduler continuous needs a model with SDPA attention; this one uses {current!r}"
        )
    AttentionInterface.register(ATTENTION, paged_attention)
    # generate() builds its padding masks as for SDPA.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def mask_placeholder(device: torch.device) -> torch.Tensor:
    """A 4-D attention mask that transformers passes through unbuilt; a step ignores it."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
