"""How attention reads a paged KV cache on this machine: decode attention over each layout.

    python benchmarks/kv_layout.py [--rows 16 64] [--context 400] [--rounds 3] [--device cpu]

One decode step's attention for every layer of a SmolLM2-135M-shaped model (30 layers, 9
query heads over 3 key/value heads of 64), rows of ``--context / 2`` to ``--context``
tokens, over four layouts of the same keys and values:

- slots: each row's keys contiguous in its own slot of the longest row; SDPA reads a view of
  the buffer in place (the layout before the paged pool);
- paged, gathered: 32-token blocks anywhere in one pool per layer, heads first
  ``(kv_heads, blocks, 32, head_dim)``; the step's blocks gathered by one ``index_select``
  per layer, which then reads as every row's keys with no further copy (what
  ``engine/attention.py`` does);
- paged, a call per row: each row's blocks contiguous in the pool (the best case of an
  allocator that keeps rows together), one SDPA call per row over a view, no copy;
- paged, blocked: no gather at all: one SDPA call over every block in place, each block
  attended by its row's query, then the blocks' partial results merged per row by their
  log-sum-exp (the online-softmax merge of a paged kernel, in PyTorch ops).

Prints the milliseconds per step of each (medians of ``--rounds`` alternating rounds of
``--repeats``), and the ratios to the slot layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

F = torch.nn.functional
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 32
GROUPS = HEADS // KV_HEADS


def timed(step: Callable[[], None], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def layouts(rows: int, context: int, device: torch.device) -> dict[str, Callable[[], None]]:
    generator = torch.Generator().manual_seed(rows)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    lengths = torch.randint(context // 2, context + 1, (rows,), generator=generator)
    window = int(lengths.max())
    blocks = -(-window // BLOCK)
    query = randn(rows, KV_HEADS, GROUPS, HEAD_DIM)  # grouped heads folded, as the engine does
    columns = torch.arange(window)
    mask = (columns[None] < lengths[:, None])[:, None, None, :].expand(rows, 1, GROUPS, window)
    mask = mask.to(device)

    slot_k = [randn(rows, KV_HEADS, window, HEAD_DIM) for _ in range(LAYERS)]
    slot_v = [randn(rows, KV_HEADS, window, HEAD_DIM) for _ in range(LAYERS)]

    def slots() -> None:
        for k, v in zip(slot_k, slot_v, strict=True):
            F.scaled_dot_product_attention(query, k, v, attn_mask=mask)

    pool_blocks = 4 * rows * blocks
    table = torch.randperm(pool_blocks, generator=generator)[: rows * blocks].to(device)
    pool_k = [randn(KV_HEADS, pool_blocks, BLOCK, HEAD_DIM) for _ in range(LAYERS)]
    pool_v = [randn(KV_HEADS, pool_blocks, BLOCK, HEAD_DIM) for _ in range(LAYERS)]
    paged_columns = torch.arange(blocks * BLOCK)
    paged_mask = (paged_columns[None] < lengths[:, None])[:, None, None, :]
    paged_mask = paged_mask.expand(rows, 1, GROUPS, blocks * BLOCK).to(device)

    def gathered() -> None:
        for k_pool, v_pool in zip(pool_k, pool_v, strict=True):
            k = k_pool.index_select(1, table).view(KV_HEADS, rows, -1, HEAD_DIM).transpose(0, 1)
            v = v_pool.index_select(1, table).view(KV_HEADS, rows, -1, HEAD_DIM).transpose(0, 1)
            F.scaled_dot_product_attention(query, k, v, attn_mask=paged_mask)

    flat_k = [k.view(KV_HEADS, -1, HEAD_DIM) for k in pool_k]
    flat_v = [v.view(KV_HEADS, -1, HEAD_DIM) for v in pool_v]
    spans = [(r * blocks * BLOCK, int(n)) for r, n in enumerate(lengths)]

    def per_row() -> None:
        for k, v in zip(flat_k, flat_v, strict=True):
            for r, (start, n) in enumerate(spans):
                F.scaled_dot_product_attention(
                    query[r : r + 1], k[None, :, start : start + n], v[None, :, start : start + n]
                )

    used = rows * blocks
    block_k = [randn(used, KV_HEADS, BLOCK, HEAD_DIM) for _ in range(LAYERS)]
    block_v = [randn(used, KV_HEADS, BLOCK, HEAD_DIM) for _ in range(LAYERS)]
    owner = torch.arange(rows).repeat_interleave(blocks).to(device)
    valid = (torch.arange(blocks)[None] < ((lengths + BLOCK - 1) // BLOCK)[:, None]).to(device)

    def blocked() -> None:
        for k, v in zip(block_k, block_v, strict=True):
            q = query.index_select(0, owner)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            o = o.view(rows, blocks, KV_HEADS, GROUPS, HEAD_DIM)
            lse = lse.view(rows, blocks, KV_HEADS, GROUPS)
            weights = torch.softmax(lse.masked_fill(~valid[:, :, None, None], -torch.inf), 1)
            (o * weights[..., None]).sum(1)

    found = {"slots": slots, "paged, gathered": gathered, "paged, a call per row": per_row}
    if device.type == "cpu":
        found["paged, blocked"] = blocked
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rows in args.rows:
        steps = layouts(rows, args.context, device)
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for round_ in range(args.rounds + 1):  # the first round warms up, untimed
            names = list(steps) if round_ % 2 else list(reversed(steps))
            for name in names:
                ms = timed(lambda s=steps[name]: (s(), sync()), args.repeats)  # type: ignore[misc]
                if round_:
                    samples[name].append(ms)
        print(
            f"decode attention, {LAYERS} layers, {rows} rows of {args.context // 2}-"
            f"{args.context} tokens, {device.type}, {torch.get_num_threads()} threads"
        )
        base = statistics.median(samples["slots"])
        for name, values in samples.items():
            ms = statistics.median(values)
            print(f"  {name:<22} {ms:8.2f} ms per step  ({ms / base:.2f}x slots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
