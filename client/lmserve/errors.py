"""The client's exception classes, one per gRPC status code the daemon uses.

Every ``grpc.RpcError`` that reaches the client is re-raised as one of these (see
``from_rpc_error``), so callers catch ``lmserve.OverloadedError`` rather than inspecting
``grpc.StatusCode`` themselves. Each class carries its code as a class attribute; the
base class ``LmserveError`` stands for any code without a class of its own, and then the
instance carries the actual code.
"""

from __future__ import annotations

import re

import grpc


class LmserveError(Exception):
    """A failed call: ``code`` is the gRPC status code, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # Whether the same call may succeed if made again later (after a back-off).
    retryable: bool = False

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
    retryable = True


class RequestTooLargeError(LmserveError):
    """The request message is larger than the server accepts (``lmserve serve
    --max-message-bytes``): gRPC refuses it with RESOURCE_EXHAUSTED before the daemon reads
    it. Not an overload: the same request always fails, so shorten it rather than retry.
    ``size`` and ``limit`` are in bytes."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, details: str = "", size: int = 0, limit: int = 0) -> None:
        super().__init__(details)
        self.size = size
        self.limit = limit


class UnavailableError(LmserveError):
    """The server cannot be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


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


# gRPC core's words for a message over a size limit: the server's receive limit
# ("SERVER: Received ...") or this client's own send limit ("Sent ...").
_TOO_LARGE = re.compile(r"(Received|Sent) message larger than max \((\d+) vs\. (\d+)\)")


def _too_large(details: str) -> RequestTooLargeError | None:
    match = _TOO_LARGE.search(details)
    if match is None or (match.group(1) == "Received" and "SERVER" not in details):
        return None  # a response over this client's receive limit is another matter
    size, limit = int(match.group(2)), int(match.group(3))
    whose = (
        "the server's limit (lmserve serve --max-message-bytes)"
        if match.group(1) == "Received"
        else "this client's limit (grpc.max_send_message_length)"
    )
    return RequestTooLargeError(
        f"request too large: {size} bytes, over {whose} of {limit} bytes; shorten it, as "
        f"sending it again can't succeed (gRPC: {details})",
        size=size,
        limit=limit,
    )


def from_rpc_error(err: grpc.RpcError) -> LmserveError:
    """The ``LmserveError`` (subclass) matching ``err``'s status code, with its details.

    Codes without a class of their own (FAILED_PRECONDITION, ABORTED, ...) give a plain
    ``LmserveError`` whose ``code`` is the received one. RESOURCE_EXHAUSTED is an
    ``OverloadedError`` (retry later), unless gRPC says the request is over a size limit:
    then it is a ``RequestTooLargeError`` (don't).
    """
    # grpc.RpcError itself declares no code()/details(); the errors raised by calls
    # (grpc.Call, grpc.aio.AioRpcError) have both, but be safe with anything else.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or ""
    if not isinstance(code, grpc.StatusCode):
        return LmserveError(details or str(err), grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        too_large = _too_large(details)
        if too_large is not None:
            return too_large
    cls = _BY_CODE.get(code)
    if cls is None:
        return LmserveError(details, code)
    return cls(details)
