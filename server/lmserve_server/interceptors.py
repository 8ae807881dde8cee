"""One server interceptor that turns exceptions raised by handlers into gRPC statuses.

An LmserveError becomes its own status code and message; anything else is logged with its
traceback and becomes INTERNAL, so a caller never sees a bare "Unexpected error".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lmserve_server.errors import LmserveError

log = logging.getLogger(__name__)


async def _abort_for(err: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(err, LmserveError):
        await context.abort(err.code, str(err))
    log.exception("%s failed", method, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service_prefix: str) -> None:
        self._prefix = service_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort_for(err, context, method)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for message in behavior(request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort_for(err, context, method)

    return wrapper
