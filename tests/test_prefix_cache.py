"""The prefix cache: its index alone (no model), then the continuous engine step by step on
real checkpoints of every decoder family, with the cache and without: a request's tokens
and logprobs are the same bits either way, rows start after their cached prefix, tenants'
salts keep their prefixes apart, a small pool evicts while rows run, faults stay with
their row."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from lmserve_server.engine.model import Engine
from lmserve_server.engine.prefix_cache import BLOCK, CachedBlock, PrefixCache, PrefixIndex
from lmserve_server.engine.rows import Row
from lmserve_server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from lmserve_server.scheduling.continuous_batch import ContinuousBatch
from lmserve_server.scheduling.planner import StepPlanner

# ---- the index alone ----------------------------------------------------------------------------


def blocks_of(tokens: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + BLOCK]) for i in range(0, len(tokens) - BLOCK + 1, BLOCK)]


def keep(index: PrefixIndex, salt: str, tokens: Sequence[int]) -> list[CachedBlock]:
    """Inserts ``tokens``' full blocks as a row's store does; returns its chain."""
    chain: list[CachedBlock] = []
    for block in blocks_of(tokens):
        placed = index.insert(salt, chain[-1] if chain else None, block)
        if placed is None:
            break
        chain.append(placed[0])
    index.touch(chain)
    return chain


def test_a_prefix_is_found_block_by_block_after_the_same_blocks_only() -> None:
    index = PrefixIndex(blocks=16)
    prompt = list(range(100))  # 3 full blocks and 4 tokens
    chain = keep(index, "", prompt)
    assert len(chain) == 3 and len(index) == 3
    assert index.match("", prompt, most=10) == chain
    assert index.match("", prompt, most=2) == chain[:2]
    assert index.match("", prompt[:70], most=10) == chain[:2]  # its third block isn't full
    # The same second block after a different first block is another block.
    other = [999, *prompt[1:]]
    assert index.match("", other, most=10) == []
    assert len(keep(index, "", other)) == 3 and len(index) == 6
    # A prompt that shares the first 40 tokens shares exactly one block.
    diverging = [*prompt[:40], *range(500, 600)]
    assert index.match("", diverging, most=10) == chain[:1]


def test_salts_keep_prefixes_apart_and_the_empty_salt_is_a_group_of_its_own() -> None:
    index = PrefixIndex(blocks=16)
    prompt = list(range(64))
    keep(index, "tenant-a", prompt)
    assert len(index.match("tenant-a", prompt, most=2)) == 2
    assert index.match("tenant-b", prompt, most=2) == []
    assert index.match("", prompt, most=2) == []
    keep(index, "", prompt)
    assert len(index) == 4, "the same tokens under two salts are two chains"


def test_a_block_kept_twice_is_shared_not_copied_again() -> None:
    index = PrefixIndex(blocks=4)
    first = keep(index, "", list(range(64)))
    placed = index.insert("", None, tuple(range(32)))
    assert placed == (first[0], False)
    assert len(index) == 2


def test_eviction_takes_the_least_recently_used_leaf_and_never_a_pinned_block() -> None:
    index = PrefixIndex(blocks=4)
    a = keep(index, "", [1] * 64)  # 2 blocks
    b = keep(index, "", [2] * 64)  # 2 blocks: the pool is full
    index.touch(a)  # a is now the most recently used
    c = keep(index, "", [3] * 32)
    assert len(c) == 1 and index.evicted == 1
    # b's leaf went (least recently used), its first block stays findable.
    assert index.match("", [2] * 64, most=2) == b[:1]
    assert index.match("", [1] * 64, most=2) == a
    # Pinned blocks (a running row about to copy them) are never evicted: with every
    # evictable block pinned, nothing new is kept.
    index.pin(a)
    index.pin(c)
    index.pin(b[:1])
    assert index.insert("", None, tuple([4] * 32)) is None
    index.unpin(b[:1])
    assert index.insert("", None, tuple([4] * 32)) is not None
    assert index.match("", [2] * 64, most=2) == []
    assert index.match("", [1] * 64, most=2) == a, "pinned blocks stay"


def test_a_parent_outlives_its_children() -> None:
    """Leaves go first, so a block is never left unreachable behind an evicted parent."""
    index = PrefixIndex(blocks=3)
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(3) for _ in range(BLOCK * rng.randint(1, 3))]
        keep(index, "", tokens)
        for block in index._order:  # every kept block is reachable from a root
            parent = block.parent
            assert parent is None or parent.key in index._blocks
            assert index._blocks[block.key] is block
        assert len(index) <= 3
        assert sum(b.children for b in index._order) == sum(
            b.parent is not None for b in index._order
        )


# ---- the engine with the cache and without ------------------------------------------------
#
# A request's tokens are compared bit for bit (logprobs included) with the cache and without
# in schedules where its company is the same either way: one request at a time, or a first
# request alone and then all the others at once, every prompt prefilled in the first step
# (a decoding row's attention is not bit-exact across companies on a CPU: SDPA splits a
# one-query call's keys across threads by the batch; that holds with or without the cache,
# and is why staggered arrivals are not compared here).


@dataclass(eq=False)
class Entry:
    row: Row


def batch_of(engine: Engine, *, prefix_tokens: int, rows: int = 12) -> ContinuousBatch[Entry]:
    budget = 2048  # every prompt of a group fits one step
    runner = engine.continuous_runner(
        slots=rows, slot_tokens=256, max_step_tokens=budget, prefix_cache_tokens=prefix_tokens
    )
    return ContinuousBatch(runner, StepPlanner(max_rows=rows, max_step_tokens=budget))


def run(
    engine: Engine,
    batch: ContinuousBatch[Entry],
    requests: Sequence[GenerationRequest],
    schedule: str,
) -> list[Row]:
    """``one-by-one``: each request after the previous ended; ``together``: the first alone,
    then every other at once. Steps run until every row has ended."""
    rows = [engine.new_row(r) for r in requests]
    groups = [[row] for row in rows] if schedule == "one-by-one" else [rows[:1], rows[1:]]
    for group in groups:
        waiting = deque(Entry(row) for row in group)
        while waiting or batch.running:
            batch.run(batch.admit_and_plan(waiting))
            batch.retire()
    return rows


def same_bits(a: GenerationOutput, b: GenerationOutput) -> bool:
    """Tokens, text, finish reason and logprobs (floats compared exactly)."""
    return (a.token_ids, a.text, a.finish_reason, a.logprobs) == (
        b.token_ids,
        b.text,
        b.finish_reason,
        b.logprobs,
    )


def shared_prompt_requests(count: int, seed: int = 0) -> list[GenerationRequest]:
    """A 70-token system prompt, then a distinct 3-40-token question; greedy, seeded and
    penalised sampling in turn, all with logprobs; then the first prompt again (wholly
    cached), one of 96 tokens (three full blocks) twice, and one sharing only the first 40
    tokens."""
    rng = random.Random(seed)
    system = [rng.randrange(50000) for _ in range(70)]
    settings = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=8),
    ]
    prompts = [
        (*system, *(rng.randrange(50000) for _ in range(rng.randint(3, 40)))) for _ in range(count)
    ]
    prompts += [prompts[0], (*system, *range(26)), (*system, *range(26))]
    prompts.append((*system[:40], *(rng.randrange(50000) for _ in range(50))))
    return [
        GenerationRequest(p, rng.randint(4, 12), settings[i % 3], logprobs=3)
        for i, p in enumerate(prompts)
    ]


@pytest.mark.parametrize("schedule", ["one-by-one", "together"])
def test_tokens_and_logprobs_are_the_same_bits_with_the_cache_and_without(
    family_engine: Engine, schedule: str
) -> None:
    engine = family_engine
    requests = shared_prompt_requests(6)
    without = run(engine, batch_of(engine, prefix_tokens=0), requests, schedule)
    cached_batch = batch_of(engine, prefix_tokens=4096)
    with_cache = run(engine, cached_batch, requests, schedule)
    for r, a, b in zip(requests, without, with_cache, strict=True):
        assert a.error is None and b.error is None
        assert same_bits(a.output(), b.output()), (len(r.prompt_ids), r.sampling)
        assert a.cached_prompt_tokens == 0
    # What a caller reads, checked against the prompts' shapes below and against the
    # cache's own counters (kept apart from the rows') at the end.
    cached = [row.output().cached_prompt_tokens for row in with_cache]
    # Every prompt computes at least its last two tokens.
    assert all(c <= len(r.prompt_ids) - 2 for c, r in zip(cached, requests, strict=True))
    assert cached[0] == 0
    assert all(c >= 64 for c in cached[1:9]), cached  # the system prompt's two full blocks
    assert cached[-1] == 32, "a prompt sharing only its first 40 tokens: one block"
    if schedule == "one-by-one":  # each finds what the ones before it kept
        first = len(requests[0].prompt_ids)
        assert cached[6] == min(first // BLOCK * BLOCK, first - 2), "the first prompt again"
        assert cached[8] == 94, "a 96-token prompt again: all but its last two tokens"
    prefixes = cached_batch.runner.cache.prefixes
    assert prefixes is not None
    assert prefixes.hits == sum(cached)
    assert prefixes.queries == sum(len(r.prompt_ids) for r in requests)


def test_eviction_under_a_small_pool_with_rows_running(engine: Engine) -> None:
    """A pool of 6 blocks for prompts of 5 different 100-token heads (3 blocks each): four
    requests one by one fill it and evict, then 10 more run at once, restoring the heads
    still kept and evicting others as they keep their own while every row runs (never a
    block a row is about to copy); every row gets its tokens without the cache's."""
    rng = random.Random(4)
    heads = [[rng.randrange(50000) for _ in range(100)] for _ in range(5)]
    requests = [
        GenerationRequest(
            (*heads[i % 5], *(rng.randrange(50000) for _ in range(rng.randint(2, 60)))),
            rng.randint(3, 15),
            SamplingParams(temperature=1.0, seed=i) if i % 2 else SamplingParams(),
            logprobs=2,
        )
        for i in range(14)
    ]

    def serve(prefix_tokens: int) -> tuple[list[Row], ContinuousBatch[Entry]]:
        batch = batch_of(engine, prefix_tokens=prefix_tokens)
        first = run(engine, batch, requests[:4], "one-by-one")
        return first + run(engine, batch, requests[3:], "together")[1:], batch

    without, _ = serve(0)
    batch = batch_of(engine, prefix_tokens=6 * BLOCK)
    prefixes = batch.runner.cache.prefixes
    assert prefixes is not None
    restores: list[int] = []
    real_restore = prefixes.restore

    def restore(cache, slot, chain):  # type: ignore[no-untyped-def]
        assert all(b.pins > 0 and b.key in prefixes.index._blocks for b in chain)
        restores.append(len(chain))
        real_restore(cache, slot, chain)

    prefixes.restore = restore  # type: ignore[method-assign]
    first = run(engine, batch, requests[:4], "one-by-one")
    evicted_before = prefixes.index.evicted
    with_cache = first + run(engine, batch, requests[3:], "together")[1:]
    for a, b in zip(without, with_cache, strict=True):
        assert b.error is None, b.error  # the restore's own checks raise into the row
        assert same_bits(a.output(), b.output())
    assert evicted_before > 0 and prefixes.index.evicted > evicted_before
    stats = prefixes.stats()
    assert len(restores) >= 3 and stats.hits > 0
    assert stats.tokens <= 6 * BLOCK == stats.capacity_tokens
    assert all(b.pins == 0 for b in prefixes.index._order), "every pin was released"


def test_faults_stay_with_their_row_and_keep_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside rows that share its cached prefix, a row whose forward fails, and one whose
    cached prefix can't be copied into its slot, fail alone (their step runs again in
    halves); the failed rows keep no block; the others get the tokens they get without the
    cache (where the same two rows fail in the forward)."""
    rng = random.Random(6)
    system = [rng.randrange(50000) for _ in range(80)]
    poison = 4242
    requests = [
        GenerationRequest((*system, *(rng.randrange(4000) for _ in range(10 + 7 * i))), 6)
        for i in range(6)
    ]
    requests[2] = GenerationRequest((*system, poison, *range(40)), 6)
    copy_fails = requests[4]

    def serve(prefix_tokens: int) -> tuple[list[Row], ContinuousBatch[Entry]]:
        batch = batch_of(engine, prefix_tokens=prefix_tokens)
        runner = batch.runner
        real_launch = runner.launch
        prefixes = runner.cache.prefixes

        def launch(chunks):  # type: ignore[no-untyped-def]
            bad = [poison] if prefixes is not None else [poison, copy_fails.prompt_ids[-1]]
            if any(t in c.tokens for c in chunks if len(c.tokens) > 1 for t in bad):
                raise RuntimeError("the model choked on this prompt")
            return real_launch(chunks)

        monkeypatch.setattr(runner, "launch", launch)
        if prefixes is not None:
            real_restore = prefixes.restore

            def restore(cache, slot, chain):  # type: ignore[no-untyped-def]
                if any(r.slot == slot and r.row.request is copy_fails for r in batch.running):
                    raise RuntimeError("the copy failed")
                real_restore(cache, slot, chain)

            prefixes.restore = restore  # type: ignore[method-assign]
        return run(engine, batch, requests, "together"), batch

    without, _ = serve(0)
    with_cache, batch = serve(4096)
    failed = [row.error is not None for row in with_cache]
    assert failed == [False, False, True, False, True, False]
    assert [row.error is not None for row in without] == failed
    for a, b in zip(without, with_cache, strict=True):
        if a.error is None:
            assert same_bits(a.output(), b.output())
    prefixes = batch.runner.cache.prefixes
    assert prefixes is not None
    kept = [b.key[1] for b in prefixes.index._order]
    assert kept and all(poison not in tokens for tokens in kept)
    # Its third block (the system prompt's end and its own first tokens) is its alone.
    assert len(copy_fails.prompt_ids) >= 3 * BLOCK
    own = tuple(copy_fails.prompt_ids[2 * BLOCK : 3 * BLOCK])
    assert own not in kept, "nothing of the failed copy"
    assert all(b.pins == 0 for b in prefixes.index._order)


def test_restore_and_store_copy_the_slot_s_bits(engine: Engine) -> None:
    """The pool's copies: a slot's full blocks kept, then restored into another slot, are
    the same bits in every layer; the pool takes what a token takes, per token kept."""
    runner = engine.continuous_runner(slots=2, slot_tokens=256, max_step_tokens=64)
    cache = runner.cache
    for t in (*cache.keys, *cache.values):
        t.normal_()
    prefixes = PrefixCache(engine.kv_shape, tokens=8 * BLOCK, device=cache.device)
    assert prefixes.nbytes == 8 * BLOCK * engine.kv_shape.bytes_per_token
    prompt = tuple(range(130))
    chain: list[CachedBlock] = []
    prefixes.store(cache, 0, "tenant-a", prompt, chain, computed=70)
    assert len(chain) == 2
    prefixes.store(cache, 0, "tenant-a", prompt, chain, computed=130)
    assert len(chain) == 4
    blocks, cached = prefixes.usable("tenant-a", prompt)
    assert blocks == chain and cached == 4 * BLOCK
    prefixes.restore(cache, 1, blocks)
    n = 4 * BLOCK
    for t in (*cache.keys, *cache.values):
        assert torch.equal(t[1, :, :n], t[0, :, :n])
        assert not torch.equal(t[1, :, n : n + 8], t[0, :, n : n + 8]), "only the blocks"
    # Kept under the row's salt: neither another tenant nor the empty salt finds them.
    assert prefixes.usable("tenant-b", prompt) == ([], 0)
    assert prefixes.usable("", prompt) == ([], 0)
    assert prefixes.usable("tenant-a", prompt[:65]) == (chain[:2], 63)


def test_rows_find_only_the_prefixes_kept_under_their_own_salt(engine: Engine) -> None:
    """The engine passes each row's ``cache_salt`` to the cache when it keeps the row's
    blocks and when it looks a prompt up: the same 100-token prompt, one request at a
    time, is found only by a request with the salt it was kept under (the empty salt being
    a group of its own)."""
    prompt = tuple(range(1000, 1100))  # three full blocks and 4 tokens
    salts = ["tenant-a", "", "tenant-b", "tenant-a", "", "tenant-b"]
    requests = [GenerationRequest(prompt, 2, cache_salt=salt) for salt in salts]
    rows = run(engine, batch_of(engine, prefix_tokens=4096), requests, "one-by-one")
    cached = [row.output().cached_prompt_tokens for row in rows]
    assert cached == [0, 0, 0, 96, 96, 96], cached


def test_a_row_whose_kept_blocks_were_evicted_keeps_its_next_ones_after_what_is_left(
    engine: Engine,
) -> None:
    """A pool of 2 blocks: row A keeps its first 2 blocks, row B keeps 2 of its own (A's
    go), then A, whose prompt has gone on, keeps again: its chain is cut back to what is
    still cached (nothing) and its blocks are kept from there, as if it had found none."""
    runner = engine.continuous_runner(slots=2, slot_tokens=256, max_step_tokens=128)
    prefixes = PrefixCache(engine.kv_shape, tokens=2 * BLOCK, device=runner.cache.device)
    rng = random.Random(9)
    a, b = ([rng.randrange(50000) for _ in range(96)] for _ in range(2))
    a_chain: list[CachedBlock] = []
    prefixes.store(runner.cache, 0, "", a, a_chain, computed=64)
    b_chain: list[CachedBlock] = []
    prefixes.store(runner.cache, 1, "", b, b_chain, computed=64)
    assert len(b_chain) == 2 and prefixes.index.evicted == 2
    prefixes.store(runner.cache, 0, "", a, a_chain, computed=96)
    assert [blk.key[1] for blk in a_chain] == blocks_of(a[:64])
    assert prefixes.usable("", a)[0] == a_chain
    assert all(blk.pins == 0 for blk in prefixes.index._order)
