"""The server interceptors of the service's calls (health and reflection pass untouched).

``ErrorInterceptor`` (innermost) turns exceptions raised by handlers into gRPC statuses: an
LmserveError becomes its own status code and message; anything else is logged with its
traceback and becomes INTERNAL, so a caller never sees a bare "Unexpected error". It also
makes a request message that does not parse an INVALID_ARGUMENT: its deserializer hands on
a ``MalformedRequest`` instead of raising inside gRPC (which would answer UNKNOWN and log a
traceback per call), so the call still passes the token check and the metrics.
``RequestInterceptor`` (outermost) gives each call a request id and records its outcome in
the metrics and the debug log. The auth interceptor (``security.py``) sits between them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from lmserve_server.errors import (
    GenerationFailedError,
    InvalidArgumentError,
    LmserveError,
    ModelLoadError,
    OutOfMemoryError,
    QueueFullError,
    ShuttingDownError,
)

if TYPE_CHECKING:
    from lmserve_server.metrics import Metrics

log = logging.getLogger(__name__)
request_log = logging.getLogger("lmserve_server.requests")

REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces, bounded
# Malformed requests are logged at most once per this many seconds: anyone can send them.
MALFORMED_LOG_INTERVAL_S = 60.0


class MalformedRequest:
    """What a call's handler gets instead of a request message that did not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as err:  # DecodeError, mostly: whatever it is, the bytes are bad
            return MalformedRequest(str(err) or type(err).__name__)

    return parse


class _RateLimitedLog:
    """Logs at most one line per ``interval_s``, counting the ones it left out."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = 0.0
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next_at:
            self._left_out += 1
            return
        if self._left_out:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, self._left_out, self._interval_s)
        self._next_at, self._left_out = now + self._interval_s, 0
        log.warning(message, *args)


# The one place where the daemon's errors meet gRPC: each class and its status code.
STATUS_CODES: dict[type[LmserveError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfMemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    GenerationFailedError: grpc.StatusCode.INTERNAL,
}


def status_code(err: LmserveError) -> grpc.StatusCode:
    """The status of ``err``: its own class's, else its nearest base class's, else INTERNAL."""
    for cls in type(err).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


# A status message rides in the response's trailing metadata, whose size a client limits
# (gRPC's default: 8 KiB): past it the client sees RESOURCE_EXHAUSTED and no reason at all. The
# daemon's reasons are one line; this bounds any text one might quote (a client's schema).
MAX_STATUS_MESSAGE_CHARS = 500


def status_message(text: str) -> str:
    """``text`` cut to ``MAX_STATUS_MESSAGE_CHARS`` characters."""
    if len(text) <= MAX_STATUS_MESSAGE_CHARS:
        return text
    return text[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."


async def _abort_for(err: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(err, LmserveError):
        await context.abort(status_code(err), status_message(str(err)))
    log.exception("%s failed", method, exc_info=err)
    await context.abort(
        grpc.StatusCode.INTERNAL, status_message(f"internal error: {type(err).__name__}: {err}")
    )


async def _refuse_malformed(
    request: MalformedRequest,
    context: grpc.aio.ServicerContext,
    method: str,
    malformed_log: _RateLimitedLog,
) -> None:
    malformed_log.warning(
        "malformed %s request from %s: %s", method, context.peer(), request.reason
    )
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service_prefix: str) -> None:
        self._prefix = service_prefix
        self._malformed_log = _RateLimitedLog(MALFORMED_LOG_INTERVAL_S)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        malformed_log = self._malformed_log
        return rewrap(
            handler,
            lambda behavior: _wrap_unary(behavior, method, malformed_log),
            lambda behavior: _wrap_stream(behavior, method, malformed_log),
            request_deserializer=_tolerant(handler.request_deserializer),
        )


Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Wrapper,
    stream: Wrapper,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped (``unary`` for a single response, ``stream`` for a
    response stream), and with ``request_deserializer`` when one is given. The service's
    methods are unary-request, but the token check refuses with a request-streaming handler
    (``security._refusing``): those are wrapped too, so their refusals are counted."""
    serializers = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serializers)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **serializers)
    return handler


def _wrap_unary(
    behavior: Callable[..., Any], method: str, malformed_log: _RateLimitedLog
) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await _refuse_malformed(request, context, method, malformed_log)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort_for(err, context, method)

    return wrapper


def _wrap_stream(
    behavior: Callable[..., Any], method: str, malformed_log: _RateLimitedLog
) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, MalformedRequest):
            await _refuse_malformed(request, context, method, malformed_log)
        try:
            async for message in behavior(request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort_for(err, context, method)

    return wrapper


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """The outermost interceptor of the service's calls: gives each one a request id (the
    caller's ``x-request-id`` metadata, else a new one, sent back in trailing metadata), and
    when it ends records its status code and latency in ``metrics`` and logs one debug line.
    Being outermost, it sees every outcome: refusals by the auth and error interceptors too.
    """

    def __init__(self, service_prefix: str, metrics: Metrics) -> None:
        self._prefix = service_prefix
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        call = _Call(self._metrics, method.rsplit("/", 1)[-1], _request_id(handler_call_details))
        return rewrap(handler, call.wrap_unary, call.wrap_stream)


def _request_id(details: grpc.HandlerCallDetails) -> str:
    """The caller's x-request-id when it is a sane one, else a new random id."""
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class _Call:
    """One call's bookkeeping: its request id, its start, its outcome."""

    def __init__(self, metrics: Metrics, method: str, request_id: str) -> None:
        self.metrics = metrics
        self.method = method
        self.request_id = request_id

    def wrap_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = _cancelled_code(context)
                raise
            finally:
                self._finish(code, time.perf_counter() - start)

        return wrapper

    def wrap_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
            code = grpc.StatusCode.UNKNOWN
            try:
                async for message in behavior(request, context):
                    yield message
                code = context.code() or grpc.StatusCode.OK
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = _cancelled_code(context)
                raise
            finally:
                self._finish(code, time.perf_counter() - start)

        return wrapper

    def _finish(self, code: grpc.StatusCode, latency_s: float) -> None:
        self.metrics.observe_call(self.method, code, latency_s)
        if request_log.isEnabledFor(logging.DEBUG):
            latency_ms = round(latency_s * 1000.0, 3)
            request_log.debug(
                "%s %s in %.1f ms (request_id=%s)",
                self.method,
                code.name,
                latency_ms,
                self.request_id,
                extra={
                    "method": self.method,
                    "status": code.name,
                    "latency_ms": latency_ms,
                    "request_id": self.request_id,
                },
            )


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A call cut short: past its deadline, or cancelled by the caller."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
