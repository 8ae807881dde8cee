"""Why the KV cache is a slot per row and not paged blocks: decode attention over each.

    python benchmarks/kv_layout.py [--rows 16] [--context 200] [--device cpu]

One decode step's attention for every layer of a GPT-2-shaped model (12 layers, 12 heads of
64), ``--rows`` rows of ``--context`` tokens each, over three layouts of the same cache:

- slots: each row's keys contiguous in its own slot; SDPA reads a view of the buffer in
  place (what ``engine/kv_cache.py`` does);
- slots with gaps: the rows sit in slots with free ones between them; the queries are
  scattered over the span and the outputs gathered back (what a step does when rows have
  left the low slots);
- paged: 16-token blocks anywhere in a pool, gathered per row into one tensor per layer and
  step before SDPA (what paged blocks cost without a paged-attention kernel).

Prints the milliseconds per step of each, and the ratios to the slot layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

F = torch.nn.functional
LAYERS, HEADS, HEAD_DIM, BLOCK = 12, 12, 64, 16


def timed(step: Callable[[], None], repeats: int) -> float:
    step()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--slot-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows, context = args.rows, args.context
    slots = 2 * rows
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    keys = [randn(slots, HEADS, args.slot_tokens, HEAD_DIM) for _ in range(LAYERS)]
    values = [randn(slots, HEADS, args.slot_tokens, HEAD_DIM) for _ in range(LAYERS)]
    query = randn(rows, HEADS, 1, HEAD_DIM)
    lengths = torch.randint(context // 2, context + 1, (rows,), generator=generator).to(device)
    window = int(lengths.max())
    columns = torch.arange(window, device=device)
    mask = (columns[None, :] < lengths[:, None])[:, None, None, :]

    def slots_view() -> None:
        for k, v in zip(keys, values, strict=True):
            F.scaled_dot_product_attention(
                query, k[:rows, :, :window], v[:rows, :, :window], attn_mask=mask
            )

    # Every other slot taken: the span is twice the rows.
    taken = torch.arange(0, slots, 2, device=device)
    span_lengths = torch.ones(slots, dtype=torch.long, device=device)
    span_lengths[taken] = lengths
    span_mask = (columns[None, :] < span_lengths[:, None])[:, None, None, :]

    def slots_with_gaps() -> None:
        for k, v in zip(keys, values, strict=True):
            q = query.new_zeros((slots, HEADS, 1, HEAD_DIM))
            q[taken] = query
            o = F.scaled_dot_product_attention(
                q, k[:, :, :window], v[:, :, :window], attn_mask=span_mask
            )
            o[taken]

    pool_blocks = slots * args.slot_tokens // BLOCK
    pool_k = [k.reshape(pool_blocks, HEADS, BLOCK, HEAD_DIM) for k in keys]
    pool_v = [v.reshape(pool_blocks, HEADS, BLOCK, HEAD_DIM) for v in values]
    blocks = -(-window // BLOCK)
    table = torch.randperm(pool_blocks, generator=generator)[: rows * blocks].to(device)
    table = table.reshape(rows, blocks)
    paged_columns = torch.arange(blocks * BLOCK, device=device)
    paged_mask = (paged_columns[None, :] < lengths[:, None])[:, None, None, :]

    def paged() -> None:
        for k_pool, v_pool in zip(pool_k, pool_v, strict=True):
            k = k_pool[table].permute(0, 2, 1, 3, 4).reshape(rows, HEADS, -1, HEAD_DIM)
            v = v_pool[table].permute(0, 2, 1, 3, 4).reshape(rows, HEADS, -1, HEAD_DIM)
            F.scaled_dot_product_attention(query, k, v, attn_mask=paged_mask)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for name, step in (("slots", slots_view), ("slots, gaps", slots_with_gaps), ("paged", paged)):
        results[name] = timed(lambda s=step: (s(), sync()), args.repeats)  # type: ignore[misc]
    print(
        f"decode attention, {LAYERS} layers, {rows} rows of {context // 2}-{context} tokens, "
        f"{device.type} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads"
    )
    for name, ms in results.items():
        print(f"  {name:<12} {ms:8.2f} ms per step  ({ms / results['slots']:.2f}x slots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
