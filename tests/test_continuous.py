"""The continuous engine step by step (``ContinuousBatch`` over a ``ModelRunner``), on real
checkpoints of every decoder family: rows that join, prefill in chunks and leave a running
batch get exactly the tokens the static engine gives them alone."""

from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

import pytest
import torch

from lmserve_server.engine import runner as runner_module
from lmserve_server.engine.attention import plan_decode_runs
from lmserve_server.engine.model import Engine
from lmserve_server.engine.prefix_cache import BLOCK
from lmserve_server.engine.rows import Row
from lmserve_server.engine.runner import Chunk, rerun_capture
from lmserve_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from lmserve_server.limits import MAX_LOGPROBS
from lmserve_server.scheduling.continuous import ContinuousScheduler
from lmserve_server.scheduling.continuous_batch import ContinuousBatch
from lmserve_server.scheduling.planner import StepPlanner
from tests.test_engine import PROMPTS, request, solo


@dataclass(eq=False)
class Entry:
    row: Row


@dataclass(frozen=True)
class Run:
    """A decode run as planned: its rows, its window (longest row), whether they differ."""

    count: int
    window: int
    ragged: bool


def batch_of(
    engine: Engine,
    *,
    rows: int = 4,
    budget: int = 16,
    slot_tokens: int = 256,
    fixed: bool = False,
    staged: bool = False,
) -> ContinuousBatch[Entry]:
    runner = engine.continuous_runner(
        slots=rows,
        kv_tokens=rows * slot_tokens,
        max_step_tokens=budget,
        fixed_shapes=fixed,
        staged=staged,
    )
    return ContinuousBatch(runner, StepPlanner(max_rows=rows, max_step_tokens=budget))


def run(
    batch: ContinuousBatch[Entry],
    rows: list[Row],
    rng: random.Random | None = None,
    arrive_every: int = 2,
) -> list[GenerationOutput]:
    """Rows arrive one every ``arrive_every`` steps (or, with ``rng``, in random groups at
    random steps); steps run until every row has ended."""
    pending, waiting, step = deque(rows), deque[Entry](), 0
    while pending or waiting or batch.running:
        if rng is None:
            if pending and step % arrive_every == 0:
                waiting.append(Entry(pending.popleft()))
        elif pending and (not batch.running or rng.random() < 0.3):
            for _ in range(rng.randint(1, 4)):
                if pending:
                    waiting.append(Entry(pending.popleft()))
        batch.run(batch.admit_and_plan(waiting))
        batch.retire()
        step += 1
    return [r.output() for r in rows]


def test_rows_joining_and_leaving_get_their_solo_tokens(family_engine: Engine) -> None:
    engine = family_engine
    limits = [20, 4, 11, 1, 15, 7, 9, 3, 12, 6]
    requests = [request(engine, p, n) for p, n in zip(PROMPTS, limits, strict=False)]
    outputs = run(batch_of(engine), [engine.new_row(r) for r in requests])
    for r, out in zip(requests, outputs, strict=True):
        assert out == solo(engine, *_args(engine, r)), engine.decode(r.prompt_ids)
    assert len({o.token_ids for o in outputs}) > len(outputs) // 2, "a mix-up would show"


def _args(engine: Engine, r: GenerationRequest) -> tuple[str, int]:
    return engine.decode(r.prompt_ids), r.max_new_tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_joins_chunks_and_slots_get_their_solo_tokens(engine: Engine, seed: int) -> None:
    """Groups of 1-4 rows with 1-120-token prompts arrive at random steps; a 16-token budget
    splits prompts into chunks beside the decoding rows; rows leave and their slots are taken
    by later rows, so decoding rows sit in slots with gaps between them."""
    rng = random.Random(seed)
    requests = [
        GenerationRequest(
            tuple(rng.randrange(50000) for _ in range(rng.randint(1, 120))), rng.randint(1, 60)
        )
        for _ in range(14)
    ]
    rows = [engine.new_row(r) for r in requests]
    outputs = run(batch_of(engine, rows=3, budget=16), rows, rng=rng)
    for r, out in zip(requests, outputs, strict=True):
        [alone] = engine.generate_batch([engine.new_row(r)])
        assert out == alone


def test_rows_of_unlike_lengths_attend_in_runs_and_get_their_solo_tokens(
    family_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short and long rows side by side: decode steps are split into runs (each read up to its
    own longest row: ragged runs with a mask, exact ones and single rows without), and every
    row still gets its solo tokens."""
    engine = family_engine
    planned: list[list[Run]] = []

    def spy(lengths):  # type: ignore[no-untyped-def]
        spans = plan_decode_runs(lengths)
        planned.append(
            [Run(n, lengths[i + n - 1], lengths[i] != lengths[i + n - 1]) for i, n in spans]
        )
        return spans

    monkeypatch.setattr(runner_module, "plan_decode_runs", spy)
    rng = random.Random(5)
    sizes = [3, 4, 180, 3, 5, 150]
    requests = [GenerationRequest(tuple(rng.randrange(50000) for _ in range(n)), 12) for n in sizes]
    rows = [engine.new_row(r) for r in requests]
    outputs = run(batch_of(engine, rows=6, budget=400), rows, arrive_every=1)
    for r, out in zip(requests, outputs, strict=True):
        [alone] = engine.generate_batch([engine.new_row(r)])
        assert out == alone
    runs = [run for plan in planned for run in plan]
    assert any(len(plan) >= 3 for plan in planned)
    assert any(r.ragged for r in runs) and any(r.count > 1 and not r.ragged for r in runs)
    assert any(r.count == 1 and r.window > 150 for r in runs), "a long row read on its own"


def test_fixed_shape_steps_pad_to_a_bucket_and_change_no_token(engine: Engine) -> None:
    """What CUDA graphs need: decode-only steps padded to 1, 2, 4, 8 rows that write to the
    scratch slot, attention over every slot's whole length; the tokens stay the same."""
    requests = [request(engine, p, n) for p, n in zip(PROMPTS, [9, 3, 14, 6, 11], strict=False)]
    plain = run(batch_of(engine, rows=5), [engine.new_row(r) for r in requests])
    fixed_batch = batch_of(engine, rows=5, fixed=True)
    shapes: set[int] = set()
    launch = fixed_batch.runner.launch

    def spy(chunks):  # type: ignore[no-untyped-def]
        if all(len(c.tokens) == 1 for c in chunks):
            shapes.add(len(chunks))
        return launch(chunks)

    fixed_batch.runner.launch = spy  # type: ignore[method-assign]
    fixed = run(fixed_batch, [engine.new_row(r) for r in requests])
    assert fixed == plain
    assert {3, 5} & shapes, "decode-only steps of 3 and 5 rows ran (padded to 4 and 8)"


def test_captured_step_graphs_replay_over_the_persistent_buffers(family_engine: Engine) -> None:
    """What CUDA graphs need, checked without a GPU: every decode-only step runs the forward
    captured for its buckets of rows and columns (``rerun_capture`` re-runs the captured
    closure over the views it was built on), and the tokens are the eager steps' tokens, so
    each step wrote its inputs exactly where the captured forward reads them."""
    engine = family_engine
    requests = [request(engine, p, n) for p, n in zip(PROMPTS, [9, 3, 14, 6, 11], strict=False)]
    plain = run(batch_of(engine, rows=5), [engine.new_row(r) for r in requests])
    batch = batch_of(engine, rows=5, fixed=True)
    pairs = batch.runner.capture_graphs(rerun_capture, max_rows=5)
    assert {rows for rows, _ in pairs} == {1, 2, 4, 8}
    # Windows up to the longest row: the model's whole context (the pool holds more).
    assert {window for _, window in pairs} == {64, 128, 256, 512, 1024}
    decode_only = 0
    launch = batch.runner.launch

    def count(chunks):  # type: ignore[no-untyped-def]
        nonlocal decode_only
        decode_only += all(len(c.tokens) == 1 for c in chunks)
        return launch(chunks)

    batch.runner.launch = count  # type: ignore[method-assign]
    graphed = run(batch, [engine.new_row(r) for r in requests])
    assert graphed == plain
    assert batch.runner.graph_replays == decode_only > 10


def test_seeded_sampling_matches_the_static_engine(family_engine: Engine) -> None:
    engine = family_engine
    kinds = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=42),
        SamplingParams(temperature=0.7, top_k=20, seed=7),
        SamplingParams(),
        SamplingParams(temperature=1.3, seed=3),
    ]
    requests = [request(engine, p, 12, sampling=k) for p, k in zip(PROMPTS, kinds, strict=False)]
    outputs = run(batch_of(engine), [engine.new_row(r) for r in requests])
    for r, out in zip(requests, outputs, strict=True):
        [alone] = engine.generate_batch([engine.new_row(r)])
        assert out == alone


def test_stop_strings_streams_and_cancellation(engine: Engine) -> None:
    full = solo(engine, "Once upon a time", 20)
    stop = full.text[len(full.text) // 2 :][:3]
    streamed: list[TextDelta] = []
    stopping = engine.new_row(request(engine, "Once upon a time", 20, stop=(stop,)))
    streaming = engine.new_row(request(engine, "Hello", 6), on_delta=streamed.append)
    leaving = engine.new_row(request(engine, "Bye", 50))
    batch = batch_of(engine)
    waiting = deque(Entry(r) for r in (stopping, streaming, leaving))
    batch.run(batch.admit_and_plan(waiting))
    leaving.cancel()
    assert [r.row for r in batch.retire()] == [leaving]
    assert batch.runner.cache.free_slots == 2, "the cancelled row's slot is free at once"
    while batch.running:
        batch.run(batch.admit_and_plan(deque()))
        batch.retire()
    assert stopping.output().finish_reason is FinishReason.STOP
    assert stopping.output().text == full.text[: full.text.index(stop)]
    out = streaming.output()
    assert out.text.startswith("".join(d.text for d in streamed))
    assert (
        tuple(t for d in streamed for t in d.token_ids)
        == out.token_ids[: sum(len(d.token_ids) for d in streamed)]
    )
    assert leaving.generated == 1


def test_a_long_prompt_never_stalls_decoding_rows_for_more_than_a_chunk(engine: Engine) -> None:
    long_prompt = " ".join(["word"] * 200)
    batch = batch_of(engine, rows=3, budget=24, slot_tokens=512)
    decoding = engine.new_row(request(engine, "Hello", 40))
    waiting = deque([Entry(decoding)])
    batch.run(batch.admit_and_plan(waiting))
    waiting.append(Entry(engine.new_row(request(engine, long_prompt, 5))))
    steps = 0
    while batch.running[-1].prefilled < 200:
        before = decoding.generated
        work = batch.admit_and_plan(waiting)
        assert sum(len(w.chunk.tokens) for w in work) <= 24
        batch.run(work)
        assert decoding.generated == before + 1, "the running row got its token this step"
        steps += 1
    assert steps == 9  # 200 prompt tokens, 23 a step beside the decoding row


class FailingCapture:
    """``rerun_capture`` for the first ``works`` forwards, then a capture that fails, as a
    CUDA graph capture can part-way (memory, an op that can't be captured)."""

    def __init__(self, works: int) -> None:
        self.works = works
        self.captured = 0

    def __call__(self, forward):  # type: ignore[no-untyped-def]
        if self.captured == self.works:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        return rerun_capture(forward)


def failing_scheduler(
    engine: Engine, executor: Executor, allow_eager_fallback: bool = False
) -> ContinuousScheduler:
    return ContinuousScheduler(
        engine,
        max_batch_size=4,
        max_queue=8,
        max_step_tokens=64,
        kv_cache_tokens=1024,
        step_graphs=FailingCapture(works=2),
        allow_eager_fallback=allow_eager_fallback,
        executor=executor,
    )


def test_a_failed_capture_stops_the_start(engine: Engine) -> None:
    """Eager decode steps are several times slower on a GPU: a daemon that falls back to
    them unasked looks healthy while it misses its latency, so the start fails, naming the
    two settings that would let it serve."""
    from concurrent.futures import ThreadPoolExecutor

    from lmserve_server.errors import StartupError

    with ThreadPoolExecutor(1) as executor:
        scheduler = failing_scheduler(engine, executor)
        with pytest.raises(StartupError) as refused:
            scheduler.prepare()
    said = str(refused.value)
    assert "operation not permitted when stream is capturing" in said
    assert "--cuda-graphs false" in said and "--allow-eager-fallback" in said


async def test_with_the_fallback_a_failed_capture_serves_eagerly(engine: Engine) -> None:
    """--allow-eager-fallback: the graphs captured before the failure are dropped (a half
    set would replay some buckets and not others), and every step runs eagerly."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(1)
    scheduler = failing_scheduler(engine, executor, allow_eager_fallback=True)
    await asyncio.get_running_loop().run_in_executor(executor, scheduler.prepare)
    scheduler.start()
    try:
        served = await scheduler.submit(request(engine, "Hello", 8))
    finally:
        await scheduler.close()
        executor.shutdown()
    assert served.value == solo(engine, "Hello", 8)
    assert scheduler._batch is not None
    runner = scheduler._batch.runner
    assert runner.graph_replays == 0 and not runner.fixed_shapes


@pytest.mark.parametrize("warm_up", [True, False])
def test_warm_up_runs_steps_through_the_runner_before_serving(
    engine: Engine, warm_up: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--warm-up under the continuous scheduler warms what it serves with: the runner's
    steps (not ``generate``), and leaves every slot free."""
    from concurrent.futures import ThreadPoolExecutor

    from lmserve_server.engine.runner import ModelRunner
    from lmserve_server.scheduling.continuous import ContinuousScheduler

    launched: list[int] = []
    launch = ModelRunner.launch

    def counting(self, chunks):  # type: ignore[no-untyped-def]
        launched.append(len(chunks))
        return launch(self, chunks)

    monkeypatch.setattr(ModelRunner, "launch", counting)
    monkeypatch.setattr(Engine, "generate_batch", None)  # would raise if warm-up used it
    scheduler = ContinuousScheduler(
        engine,
        max_batch_size=4,
        max_queue=8,
        max_step_tokens=64,
        kv_cache_tokens=1024,
        warm_up=warm_up,
        executor=ThreadPoolExecutor(1),
    )
    scheduler.prepare()
    assert bool(launched) == warm_up
    assert scheduler._batch is not None and scheduler._batch.runner.cache.free_slots == 4


def test_the_gpu_s_staging_path_gives_the_same_tokens(engine: Engine) -> None:
    """``staged``: the inputs copied from a host buffer to a device buffer and the tokens
    back through a download buffer, as on a GPU; every option, sampling included."""
    kinds = [
        {"sampling": SamplingParams(temperature=0.9, top_p=0.9, seed=1), "logprobs": 3},
        {"sampling": SamplingParams(repetition_penalty=1.3, logit_bias=((11, 2.0),))},
        {"min_new_tokens": 4, "stop": ("the",)},
        {},
    ]
    requests = [request(engine, p, 10, **k) for p, k in zip(PROMPTS, kinds, strict=False)]
    plain = run(batch_of(engine), [engine.new_row(r) for r in requests])
    staged = run(batch_of(engine, staged=True), [engine.new_row(r) for r in requests])
    assert staged == plain


def test_the_largest_bucket_with_the_most_logprobs_fits_the_download(engine: Engine) -> None:
    """128 slots, fixed shapes, staged: a 128-row bucket where one row asks the most
    logprobs the validator allows (2 + 2 x MAX_LOGPROBS values a row) downloads whole."""
    batch = batch_of(engine, rows=128, budget=512, slot_tokens=32, fixed=True, staged=True)
    pairs = batch.runner.capture_graphs(rerun_capture, max_rows=128)
    assert (128, 64) in pairs
    rows = [engine.new_row(request(engine, "Hi", 4)) for _ in range(127)]
    asking = engine.new_row(request(engine, "Hello", 4, logprobs=MAX_LOGPROBS))
    waiting = deque(Entry(r) for r in [*rows, asking])  # all at once
    while waiting or batch.running:
        batch.run(batch.admit_and_plan(waiting))
        batch.retire()
    assert len(asking.output().logprobs) == 4
    assert all(len(lp.top) == MAX_LOGPROBS for lp in asking.output().logprobs)
    assert batch.runner.graph_replays > 0


def test_graphs_survive_long_penalised_prompts(engine: Engine) -> None:
    """Penalised rows with long prompts keep their history on the device, not in the
    step's inputs, so the inputs keep their captured places: a plain load afterwards still
    replays every decode step's graph."""
    batch = batch_of(engine, rows=4, budget=64, slot_tokens=512, fixed=True)
    batch.runner.capture_graphs(rerun_capture, max_rows=4)
    long_prompt = " ".join(["word"] * 450)
    penalised = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5)
    run(batch, [engine.new_row(request(engine, long_prompt, 5, sampling=penalised))] * 3)
    before = batch.runner.graph_replays
    launch = batch.runner.launch
    decode_only = 0

    def count(chunks):  # type: ignore[no-untyped-def]
        nonlocal decode_only
        decode_only += all(len(c.tokens) == 1 for c in chunks)
        return launch(chunks)

    batch.runner.launch = count  # type: ignore[method-assign]
    run(batch, [engine.new_row(request(engine, p, 8)) for p in PROMPTS[:4]])
    assert batch.runner.graph_replays - before == decode_only > 5


def test_graphs_are_captured_largest_first(engine: Engine) -> None:
    """Largest first, as vLLM does, so that the smaller graphs' work memory fits in what the
    shared pool already holds."""
    batch = batch_of(engine, rows=4, slot_tokens=128, fixed=True)
    sizes: list[tuple[int, ...]] = []

    def recording(forward):  # type: ignore[no-untyped-def]
        replay, output = rerun_capture(forward)
        sizes.append(tuple(output.shape))
        return replay, output

    batch.runner.capture_graphs(recording, max_rows=4)
    assert [s[1] for s in sizes] == sorted((s[1] for s in sizes), reverse=True)
    assert sizes[0][1] == 4 and sizes[-1][1] == 1


@pytest.mark.parametrize(
    "chunkings",
    [[[31, 2, 67], [64, 36]], [[5, 90, 5], [7, 93], [2, 96, 2]]],
    ids=["split", "uneven"],
)
def test_a_prompt_s_keys_values_and_logits_are_the_same_bits_however_chunked(
    family_engine: Engine, chunkings: list[list[int]]
) -> None:
    """Prompt tokens attend in tiles of fixed positions (``engine/attention.py``): a 100-token
    prompt prefilled in one chunk, or in chunks of any sizes, beside another prompt's chunks
    and a decoding row that differ from step to step, leaves the same bits in every layer's
    keys and values and samples the same token with the same logprobs. (The prefix cache's
    exactness rests on it: a cached prefix is the bits the row would compute itself.)"""
    engine = family_engine
    rng = random.Random(3)
    prompt = [rng.randrange(50000) for _ in range(100)]
    other = [rng.randrange(50000) for _ in range(200)]
    request = GenerationRequest(tuple(prompt), 1, logprobs=5)

    def prefill(sizes: list[int]) -> tuple[list[torch.Tensor], object]:
        runner = engine.continuous_runner(slots=3, kv_tokens=12 * BLOCK, max_step_tokens=512)
        # Each row's blocks, the prompt's out of order in the pool.
        mine, company_blocks, decoding = (2, 0, 3, 1), (4, 5, 6, 7), (8, 9, 10, 11)
        runner.sampling.admit(0, request, seed=0)
        start, company = 0, 3 * len(sizes)
        for n in sizes:
            last = start + n == len(prompt)
            chunks = [
                Chunk(0, prompt[start : start + n], start, sample=last, blocks=mine),
                # another prompt's chunk
                Chunk(1, other[company : company + 9], company, blocks=company_blocks),
                Chunk(2, (other[n],), 40 + n % 50, sample=True, blocks=decoding),  # decoding
            ]
            results = runner.execute(chunks)
            start, company = start + n, company + 9
        kv = [
            t[:, list(mine)].flatten(1, 2)[:, : len(prompt)].clone()
            for t in (*runner.cache.keys, *runner.cache.values)
        ]
        return kv, results[0]

    reference_kv, reference_token = prefill([len(prompt)])
    for sizes in chunkings:
        kv, token = prefill(sizes)
        assert all(torch.equal(a, b) for a, b in zip(kv, reference_kv, strict=True)), sizes
        assert token == reference_token, sizes


def test_a_pool_too_small_for_every_row_preempts_and_changes_no_token(engine: Engine) -> None:
    """16 rows over a pool of 8 blocks (a row takes up to 3): the most recently admitted
    rows give their blocks back as older ones grow, and resume later by computing their
    prompt and tokens again; every request completes with the tokens and text it gets from
    a pool that holds them all (greedy and seeded), the same cached prompt tokens (a resumed
    row finds its own blocks, but was counted when first admitted), and every block comes
    back."""
    rng = random.Random(11)
    requests = [
        GenerationRequest(
            tuple(rng.randrange(50000) for _ in range(rng.randint(10, 50))),
            rng.randint(20, 40),
            SamplingParams(temperature=1.0, seed=i) if i % 2 else SamplingParams(),
        )
        for i in range(16)
    ]

    def serve(kv_tokens: int) -> tuple[list[GenerationOutput], int]:
        runner = engine.continuous_runner(
            slots=16, kv_tokens=kv_tokens, max_step_tokens=512, prefix_cache_tokens=kv_tokens
        )
        batch = ContinuousBatch(runner, StepPlanner(max_rows=16, max_step_tokens=512))
        rows = [engine.new_row(r) for r in requests]
        waiting = deque(Entry(row) for row in rows)
        while waiting or batch.running:
            batch.run(batch.admit_and_plan(waiting))
            batch.retire()
        assert runner.cache.pool.held == 0 and runner.cache.free_slots == 16
        # A resumed row is looked up in the prefix cache once, when first admitted.
        prefixes = runner.cache.prefixes
        assert prefixes is not None
        assert prefixes.queries == sum(len(r.prompt_ids) for r in requests)
        return [row.output() for row in rows], runner.cache.pool.preempted

    large, none = serve(16 * 3 * BLOCK)
    small, preempted = serve(8 * BLOCK)
    assert none == 0 and preempted > 0
    assert [(o.token_ids, o.text, o.cached_prompt_tokens) for o in small] == [
        (o.token_ids, o.text, o.cached_prompt_tokens) for o in large
    ]
    assert sum(len(o.token_ids) for o in small) > 16 * 12
