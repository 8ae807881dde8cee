"""The continuous runner as both schedulers use it: how big its KV cache is, how it is made
ready before serving (cache and buffers allocated, decode steps captured as graphs, a
warm-up through its steps), and a batch of rows run through its steps to the end.

The continuous scheduler admits requests between any two steps; the static scheduler, when
its engine is ``steps`` (a GPU's default), runs each batch the micro-batcher forms to the end
(``run_to_end``): one call per batch, as with ``generate``, but packed instead of padded and
over the same captured decode steps, so the GPU's fast path serves both modes. The prefix
cache belongs to the runner's KV cache, so it serves both too: a static batch's rows find
the prefixes of earlier batches and of the rows admitted before them in the same batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmserve_server.engine.kv_cache import plan_capacity
from lmserve_server.engine.model import Engine
from lmserve_server.engine.rows import Row
from lmserve_server.engine.runner import Capture, ModelRunner
from lmserve_server.engine.types import GenerationOutput
from lmserve_server.errors import StartupError
from lmserve_server.scheduling.continuous_batch import ContinuousBatch
from lmserve_server.scheduling.planner import StepPlanner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """How the runner is built: at most ``rows`` rows at once over a KV cache of
    ``kv_tokens`` (``capacity``), steps of at most ``max_step_tokens``, decode steps captured
    with ``step_graphs`` (None: eager; a capture that fails stops the start unless
    ``allow_eager_fallback``), two short requests run through it first when
    ``warm_up``, a prefix cache of up to ``prefix_cache_tokens`` of the cache's blocks (0:
    none; ``prefix_capacity``)."""

    rows: int
    kv_tokens: int
    max_step_tokens: int
    step_graphs: Capture | None = None
    allow_eager_fallback: bool = False
    warm_up: bool = False
    prefix_cache_tokens: int = 0


def capacity(
    engine: Engine,
    rows: int,
    kv_cache_tokens: int,
    kv_cache_memory: float,
    kv_cache_host_memory: float,
) -> int:
    """The KV cache's tokens: ``--kv-cache-tokens``, else a whole context for every row,
    at most ``--kv-cache-memory`` of a GPU's free memory, or on a CPU
    ``--kv-cache-host-memory`` of the host's memory."""
    if engine.input_device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(engine.input_device)
        fraction = kv_cache_memory
    else:
        free_bytes, fraction = host_memory_bytes(), kv_cache_host_memory
    return plan_capacity(
        engine.kv_shape,
        rows=rows,
        context=engine.max_context,
        tokens=kv_cache_tokens,
        free_bytes=free_bytes,
        memory_fraction=fraction,
    )


def host_memory_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def prefix_capacity(enabled: bool, tokens: int, kv_tokens: int) -> int:
    """The most tokens of the KV cache's blocks the prefix cache keeps findable
    (``--prefix-cache``, ``--prefix-cache-tokens``): 0 when it is off, else ``tokens`` or by
    default the whole cache (a cached block takes no memory of its own: it is a block no
    row holds any more, or one that rows share)."""
    if not enabled:
        return 0
    return min(tokens, kv_tokens) if tokens else kv_tokens


@dataclass(eq=False)
class _Entry:
    row: Row


def prepare_runner(engine: Engine, settings: StepSettings) -> ModelRunner:
    """A runner with its KV cache and buffers allocated, its decode steps captured, warmed
    up when asked. On the engine thread.

    A capture that fails is a StartupError: eager decode steps on a GPU run at a fraction
    of the graphed speed, and a fleet that silently serves that way looks healthy while it
    misses its latency. ``allow_eager_fallback`` (``--allow-eager-fallback``) trades that
    for availability: a warning, and every step eager."""
    runner = engine.continuous_runner(
        slots=settings.rows,
        kv_tokens=settings.kv_tokens,
        max_step_tokens=settings.max_step_tokens,
        fixed_shapes=settings.step_graphs is not None,
        prefix_cache_tokens=settings.prefix_cache_tokens,
    )
    if settings.step_graphs is not None:
        started = time.perf_counter()
        try:
            pairs = runner.capture_graphs(settings.step_graphs, max_rows=settings.rows)
        except Exception as err:
            if not settings.allow_eager_fallback:
                raise StartupError(
                    f"could not capture the decode steps as CUDA graphs ({err!r}); serve "
                    "without them with --cuda-graphs false, or let a failed capture fall "
                    "back to eager steps with --allow-eager-fallback"
                ) from err
            runner.drop_graphs()
            log.warning(
                "could not capture the decode steps (%r); running them eagerly "
                "(--allow-eager-fallback)",
                err,
            )
        else:
            log.info(
                "captured the decode step for %d bucket(s) of rows x attention window (%s) "
                "in %.1f s",
                len(pairs),
                ", ".join(f"{rows}x{window}" for rows, window in pairs),
                time.perf_counter() - started,
            )
    if settings.warm_up:
        engine.warm_up_kernels()
        run_to_end(runner, planner(settings), engine.warm_up_rows())
        if runner.cache.prefixes is not None:
            runner.cache.prefixes.reset_counts()  # the warm-up is not traffic
    return runner


def planner(settings: StepSettings) -> StepPlanner:
    return StepPlanner(max_rows=settings.rows, max_step_tokens=settings.max_step_tokens)


def run_to_end(
    runner: ModelRunner, step_planner: StepPlanner, rows: Sequence[Row]
) -> list[GenerationOutput | Exception]:
    """Runs ``rows`` (at most the runner's slots) through steps until every one has ended;
    returns each row's outcome: its output, or the error it was stopped with. A row that
    fails alone in a step gets the error; the others go on (``continuous_batch.py``)."""
    batch: ContinuousBatch[_Entry] = ContinuousBatch(runner, step_planner)
    waiting = deque(_Entry(row) for row in rows if not row.done)
    while waiting or batch.running:
        batch.run(batch.admit_and_plan(waiting))
        batch.retire()
    return [row.error if row.error is not None else row.output() for row in rows]
