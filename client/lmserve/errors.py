"""The client's exception classes, one per gRPC status code the daemon uses.

Every ``grpc.RpcError`` that reaches the client is re-raised as one of these (see
``from_rpc_error``), so callers catch ``lmserve.OverloadedError`` rather than inspecting
``grpc.StatusCode`` themselves. Each class carries its code as a class attribute; the
base class ``LmserveError`` stands for any code without a class of its own, and then the
instance carries the actual code.
"""

from __future__ import annotations

import grpc


class LmserveError(Exception):
    """A failed call: ``code`` is the gRPC status code, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        # Only the base class is built with an explicit code (one that has no subclass);
        # setting it on the instance keeps the subclasses' class attribute untouched.
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class InvalidArgumentError(LmserveError):
    """A request field is out of range or missing; ``details`` names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class OverloadedError(LmserveError):
    """The server's queue is full (RESOURCE_EXHAUSTED); back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(LmserveError):
    """The server cannot be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(LmserveError):
    """The call did not finish within its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(LmserveError):
    """The call carried no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LmserveError):
    """The credentials are valid but not allowed to make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFoundError(LmserveError):
    """The server does not know the requested resource."""

    code = grpc.StatusCode.NOT_FOUND


class UnimplementedError(LmserveError):
    """The server does not implement this RPC (e.g. an older or partial daemon)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LmserveError):
    """The server failed while handling the call."""

    code = grpc.StatusCode.INTERNAL


class RequestCancelledError(LmserveError):
    """The call was cancelled (named so as not to shadow ``asyncio.CancelledError``)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[LmserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OverloadedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        NotFoundError,
        UnimplementedError,
        InternalError,
        RequestCancelledError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> LmserveError:
    """The ``LmserveError`` (subclass) matching ``err``'s status code, with its details.

    Codes without a class of their own (FAILED_PRECONDITION, ABORTED, ...) give a plain
    ``LmserveError`` whose ``code`` is the received one.
    """
    # grpc.RpcError itself declares no code()/details(); the errors raised by calls
    # (grpc.Call, grpc.aio.AioRpcError) have both, but be safe with anything else.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or ""
    if not isinstance(code, grpc.StatusCode):
        return LmserveError(details or str(err), grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code)
    if cls is None:
        return LmserveError(details, code)
    return cls(details)
