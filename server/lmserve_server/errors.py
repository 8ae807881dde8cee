"""The daemon's exception classes: what went wrong, in the daemon's own terms.

The engine, the schedulers and the validation raise these; nothing here knows gRPC. The edge
(``interceptors.py``) maps each class to its status code, so no handler needs its own
try/except and the engine core can be used and tested without a server.
"""

from __future__ import annotations


class LmserveError(Exception):
    """Base class: a failure reported to the caller with its message."""


class InvalidArgumentError(LmserveError):
    """A request field is out of range; the message names the field and the limit."""


class QueueFullError(LmserveError):
    """The queue holds ``max_queue`` requests already; the caller should back off."""


class ShuttingDownError(LmserveError):
    """The daemon is draining and accepts no new work, or stopped before a request ended."""


class ModelLoadError(LmserveError):
    """The model or tokenizer could not be loaded; the message says what to do."""


class StartupError(LmserveError):
    """The daemon can't serve as configured; the message names the setting to change."""


class GenerationFailedError(LmserveError):
    """The model failed for this request (alone, after its company was retried apart)."""


class OutOfMemoryError(LmserveError):
    """The device ran out of memory for this request, even in a batch of its own."""


def queue_full(depth: int, max_queue: int) -> QueueFullError:
    """The one message for a full queue, wherever it is noticed."""
    return QueueFullError(f"queue is full: {depth} requests waiting (--max-queue {max_queue})")


def shutting_down() -> ShuttingDownError:
    """The one message for a request that comes once the drain has begun."""
    return ShuttingDownError("the server is shutting down and accepts no new requests")
