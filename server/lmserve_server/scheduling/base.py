"""What the service needs of a scheduler, and the pieces both schedulers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lmserve_server.engine.rows import DeltaSink
from lmserve_server.engine.types import (
    GenerationOutput,
    GenerationRequest,
    KVCacheBlocks,
    PrefixCacheStats,
)
from lmserve_server.errors import queue_full
from lmserve_server.limits import RequestTokenLimit
from lmserve_server.scheduling.batcher import Served

# What a request stopped by the drain deadline (or a crash) tells its caller, in both modes.
STOPPED = "the server shut down before this request finished"


@dataclass(frozen=True)
class Capacity:
    """What a scheduler can take, as ``ModelInfo`` reports it."""

    scheduler: str  # "static" or "continuous"
    max_request_tokens: int  # prompt + max_new_tokens of one request, at most
    kv_cache_tokens: int  # the preallocated KV cache (0: it grows per batch)
    max_step_tokens: int  # tokens per continuous step (0: static)
    max_batch_tokens: int  # padded tokens per static batch (0: no limit)

    @property
    def request_tokens(self) -> RequestTokenLimit:
        """``max_request_tokens`` and the setting behind it: a static batch's token limit
        when it is the smaller one, else the KV cache's size (continuous, static steps)."""
        if self.max_batch_tokens and self.max_request_tokens == self.max_batch_tokens:
            return RequestTokenLimit(self.max_request_tokens, "--max-batch-tokens")
        return RequestTokenLimit(self.max_request_tokens, "--kv-cache-tokens")


class Scheduler(Protocol):
    """The static micro-batching scheduler and the continuous one both fit this."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def busy(self) -> bool: ...

    @property
    def capacity(self) -> Capacity: ...

    @property
    def kv_cache_blocks(self) -> KVCacheBlocks:
        """The preallocated KV cache's blocks (all 0 without one); read from any thread."""

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The prefix cache's counters (all 0 without one); read from any thread."""

    def prepare(self) -> None:
        """Allocates what the scheduler needs ahead (on the engine thread, before start)."""

    def start(self) -> None: ...

    def check_room(self) -> None:
        """Raises QueueFullError when no request can be queued now (before any work)."""

    async def submit(
        self, request: GenerationRequest, on_delta: DeltaSink | None = None
    ) -> Served[GenerationOutput]:
        """Runs ``request``; ``on_delta`` (called on the engine thread) gets its stream.
        Cancelling the caller cancels the request wherever it is."""

    async def close(self, drain: bool = True) -> None:
        """Accepts no more; ``drain`` runs what was accepted, else waiting requests fail and
        running ones stop at their next step, their callers getting ShuttingDownError."""


def check_room(depth: int, max_queue: int) -> None:
    """The queue bound, the same everywhere it is checked."""
    if depth >= max_queue:
        raise queue_full(depth, max_queue)
