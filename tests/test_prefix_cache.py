"""The prefix cache: its index alone (no model), then the continuous engine step by step on
real checkpoints of every decoder family, with the cache and without: a request's tokens
and logprobs are the same bits either way, rows start after their cached prefix, tenants'
salts keep their prefixes apart, a small pool evicts while rows run, faults stay with
their row."""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from lmserve_server.engine.block_pool import BlockPool
from lmserve_server.engine.model import Engine
from lmserve_server.engine.prefix_cache import BLOCK, CachedBlock, PrefixCache, PrefixIndex
from lmserve_server.engine.rows import Row
from lmserve_server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from lmserve_server.scheduling.continuous_batch import ContinuousBatch
from lmserve_server.scheduling.planner import StepPlanner

# ---- the index alone ----------------------------------------------------------------------------


def blocks_of(tokens: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + BLOCK]) for i in range(0, len(tokens) - BLOCK + 1, BLOCK)]


_slots = itertools.count()


def keep(index: PrefixIndex, salt: str, tokens: Sequence[int]) -> list[CachedBlock]:
    """Inserts ``tokens``' full blocks as a row's store does; returns its chain."""
    chain: list[CachedBlock] = []
    for block in blocks_of(tokens):
        placed = index.insert(salt, chain[-1] if chain else None, block, next(_slots))
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
    placed = index.insert("", None, tuple(range(32)), 99)
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
    # Pinned blocks (a row keeping a chain after them) are never evicted: with every
    # evictable block pinned, nothing new is kept.
    index.pin(a)
    index.pin(c)
    index.pin(b[:1])
    assert index.insert("", None, tuple([4] * 32), 99) is None
    index.unpin(b[:1])
    assert index.insert("", None, tuple([4] * 32), 99) is not None
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
        slots=rows,
        kv_tokens=rows * 256,
        max_step_tokens=budget,
        prefix_cache_tokens=prefix_tokens,
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
    """An index of 6 blocks for prompts of 5 different 100-token heads (3 blocks each):
    four requests one by one fill it and evict, then 10 more run at once, sharing the heads
    still kept in place and evicting others as they keep their own while every row runs
    (never a block a row holds); every row gets its tokens without the cache's."""
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
    first = run(engine, batch, requests[:4], "one-by-one")
    evicted_before = prefixes.index.evicted
    with_cache = first + run(engine, batch, requests[3:], "together")[1:]
    for a, b in zip(without, with_cache, strict=True):
        assert b.error is None, b.error
        assert same_bits(a.output(), b.output())
    assert evicted_before > 0 and prefixes.index.evicted > evicted_before
    stats = prefixes.stats()
    assert sum(row.cached_prompt_tokens > 0 for row in with_cache) >= 3 and stats.hits > 0
    assert stats.tokens <= 6 * BLOCK == stats.capacity_tokens
    assert all(b.pins == 0 for b in prefixes.index._order), "every pin was released"
    pool = batch.runner.cache.pool
    assert pool.held == 0 and pool.available == pool.blocks, "every block given back"


def test_faults_stay_with_their_row_and_keep_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside rows that share its cached prefix, two rows whose forward fails (one of them
    after a cached prefix) fail alone (their step runs again in halves); the failed rows
    keep no block of their own; the others get the tokens they get without the cache."""
    rng = random.Random(6)
    system = [rng.randrange(50000) for _ in range(80)]
    poison = 4242
    requests = [
        GenerationRequest((*system, *(rng.randrange(4000) for _ in range(10 + 7 * i))), 6)
        for i in range(6)
    ]
    requests[2] = GenerationRequest((*system, poison, *range(40)), 6)
    fails_after_cache = requests[4]

    def serve(prefix_tokens: int) -> tuple[list[Row], ContinuousBatch[Entry]]:
        batch = batch_of(engine, prefix_tokens=prefix_tokens)
        runner = batch.runner
        real_launch = runner.launch

        def launch(chunks):  # type: ignore[no-untyped-def]
            bad = [poison, fails_after_cache.prompt_ids[-1]]
            if any(t in c.tokens for c in chunks if len(c.tokens) > 1 for t in bad):
                raise RuntimeError("the model choked on this prompt")
            return real_launch(chunks)

        monkeypatch.setattr(runner, "launch", launch)
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
    assert len(fails_after_cache.prompt_ids) >= 3 * BLOCK
    assert with_cache[4].cached_prompt_tokens > 0
    own = tuple(fails_after_cache.prompt_ids[2 * BLOCK : 3 * BLOCK])
    assert own not in kept, "nothing of the failed row's own"
    assert all(b.pins == 0 for b in prefixes.index._order)


def test_store_caches_the_row_s_own_blocks_in_place() -> None:
    """A row's full prompt blocks become findable as they are (its table's blocks, no
    copy); a later row that starts the same way shares them; they stay cached, idle, once
    no row holds them, and go when the pool needs their room."""
    pool = BlockPool(8)
    prefixes = PrefixCache(pool, tokens=8 * BLOCK)
    prompt = tuple(range(130))
    table = pool.take(5)
    assert table == [0, 1, 2, 3, 4]
    chain: list[CachedBlock] = []
    prefixes.store(table, "tenant-a", prompt, chain, computed=70)
    assert [b.slot for b in chain] == [0, 1]
    prefixes.store(table, "tenant-a", prompt, chain, computed=130)
    assert [b.slot for b in chain] == [0, 1, 2, 3]
    blocks, cached = prefixes.usable("tenant-a", prompt)
    assert blocks == chain and cached == 4 * BLOCK
    # Kept under the row's salt: neither another tenant nor the empty salt finds them.
    assert prefixes.usable("tenant-b", prompt) == ([], 0)
    assert prefixes.usable("", prompt) == ([], 0)
    assert prefixes.usable("tenant-a", prompt[:65]) == (chain[:2], 63)
    pool.share(b.slot for b in blocks)  # a second row holds them too
    pool.release(table)  # the first row ends
    assert pool.refs[:5] == [1, 1, 1, 1, 0] and pool.available == 4
    pool.release(b.slot for b in blocks)  # and the second
    assert pool.available == 8 and pool.free == 4 and prefixes.index.idle == 4
    # The pool takes the free blocks first, then evicts cached ones, leaves first.
    assert sorted(pool.take(5) or []) == [3, 4, 5, 6, 7]
    assert prefixes.usable("tenant-a", prompt)[0] == chain[:3]
    assert prefixes.stats().evicted_tokens == BLOCK


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


def test_a_full_index_keeps_no_more_until_its_blocks_are_idle() -> None:
    """An index of 2 blocks: row A keeps its first 2 blocks; row B, while A holds them,
    keeps none; once A has ended, B keeps its own (A's go, least recently used first)."""
    pool = BlockPool(8)
    prefixes = PrefixCache(pool, tokens=2 * BLOCK)
    rng = random.Random(9)
    a, b = ([rng.randrange(50000) for _ in range(96)] for _ in range(2))
    a_table, b_table = pool.take(3), pool.take(3)
    assert a_table is not None and b_table is not None
    a_chain: list[CachedBlock] = []
    prefixes.store(a_table, "", a, a_chain, computed=64)
    b_chain: list[CachedBlock] = []
    prefixes.store(b_table, "", b, b_chain, computed=64)
    assert len(a_chain) == 2 and b_chain == []
    pool.release(a_table)
    prefixes.store(b_table, "", b, b_chain, computed=96)
    assert [blk.key[1] for blk in b_chain] == blocks_of(b[:64])
    assert prefixes.index.evicted == 2 and prefixes.usable("", a)[0] == []
    assert pool.available == 5


def test_rows_sharing_a_system_prompt_hold_its_blocks_once(engine: Engine) -> None:
    """32 requests of one 510-token system prompt and a 6-token question each, the first
    alone and then the others at once: while they run the pool holds the prompt's shared
    blocks once and each row's own blocks, not a copy of the prompt per row."""
    rng = random.Random(12)
    system = [rng.randrange(50000) for _ in range(510)]
    requests = [
        GenerationRequest((*system, *(rng.randrange(50000) for _ in range(6))), 4)
        for _ in range(32)
    ]
    batch = batch_of(engine, prefix_tokens=4096, rows=32)
    pool = batch.runner.cache.pool
    run(engine, batch, requests[:1], "one-by-one")
    rows = [engine.new_row(r) for r in requests[1:]]
    waiting = deque(Entry(row) for row in rows)
    held = 0
    while waiting or batch.running:
        batch.run(batch.admit_and_plan(waiting))
        held = max(held, pool.held)
        batch.retire()
    shared = len(system) // BLOCK  # 15 full blocks of the system prompt alone
    own = -(-(len(requests[0].prompt_ids) + 4) // BLOCK) - shared  # 2 a row
    assert all(row.cached_prompt_tokens == shared * BLOCK for row in rows)
    assert shared + 31 * own <= held <= 1.2 * (shared + 31 * own)
