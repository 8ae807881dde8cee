"""The daemon's exception classes, each carrying the gRPC status code it maps to.

Code anywhere in the server raises these; one interceptor (``interceptors.py``) turns them
into a gRPC status with the exception's message, so no handler needs its own try/except.
"""

from __future__ import annotations

import grpc


class LmserveError(Exception):
    """Base class: a failure that is reported to the caller with ``code`` and the message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(LmserveError):
    """A request field is out of range; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class QueueFullError(LmserveError):
    """The batching queue holds ``max_queue`` requests already; the caller should back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDownError(LmserveError):
    """The daemon is draining and accepts no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(LmserveError):
    """The model or tokenizer could not be loaded; the message says what to do."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class GenerationFailedError(LmserveError):
    """The model's generate call failed for this request."""

    code = grpc.StatusCode.INTERNAL


class OutOfMemoryError(LmserveError):
    """The device ran out of memory for this request, even in a batch of its own."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
