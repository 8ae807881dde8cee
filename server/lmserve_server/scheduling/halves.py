"""Faults stay with their request: a group of items that fails runs again in halves, down to
the items that fail alone. The one home of that rule, for the static scheduler's batches
(``batcher.py``, asynchronous) and the continuous batch's steps (``continuous_batch.py``).

Each function returns one outcome per item, in order: ``run``'s result for it, or the
exception its smallest failing group raised.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


def run_in_halves(
    items: Sequence[T], run: Callable[[Sequence[T]], Sequence[R]], what: str
) -> list[R | Exception]:
    """``run(items)``, and when it raises, each half the same way."""
    try:
        return list(run(items))
    except Exception as err:
        if len(items) == 1:
            log.warning("a %s of one request failed: %r", what, err)
            return [err]
        log.warning("a %s of %d requests failed (%r); retrying its halves", what, len(items), err)
    half = len(items) // 2
    return run_in_halves(items[:half], run, what) + run_in_halves(items[half:], run, what)


async def run_in_halves_async(
    items: Sequence[T], run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], what: str
) -> list[R | Exception]:
    """``await run(items)``, and when it raises, each half the same way."""
    try:
        return list(await run(items))
    except Exception as err:
        if len(items) == 1:
            log.warning("a %s of one request failed: %r", what, err)
            return [err]
        log.warning("a %s of %d requests failed (%r); retrying its halves", what, len(items), err)
    half = len(items) // 2
    first = await run_in_halves_async(items[:half], run, what)
    return first + await run_in_halves_async(items[half:], run, what)
