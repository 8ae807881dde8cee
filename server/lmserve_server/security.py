"""Who may talk to the daemon: TLS / mutual-TLS server credentials and bearer-token auth.

``server_credentials`` reads the PEM files of ``--tls-cert``/``--tls-key`` (and, for mTLS,
``--tls-client-ca``: clients must then present a certificate signed by it).
``TokenAuthInterceptor`` refuses every call without ``authorization: Bearer <token>``
metadata matching the configured token (compared in constant time) with UNAUTHENTICATED;
health checking and reflection stay open so load balancers and grpcurl work without it.
``read_token_file`` loads the token for ``--auth-token-file``.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Services anyone may call, token or not.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_BEARER = "bearer "


def _read_pem(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise OSError(f"{flag} {path}: cannot read it: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS credentials; with ``client_ca``, clients must present a certificate it signed."""
    pair = [(_read_pem(key, "--tls-key"), _read_pem(cert, "--tls-cert"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair,
        root_certificates=_read_pem(client_ca, "--tls-client-ca"),
        require_client_auth=True,
    )


def check_tls_files(cert: str, key: str, client_ca: str | None) -> None:
    """Raises ValueError (OSError for a file that can't be read), naming the flag, for what
    gRPC would find wrong with the TLS files only when it binds, after the model has loaded,
    and then say as "Invalid private key." followed by a misleading "Failed to bind": a key
    that is not the certificate's, a file that holds no certificate or no key, an encrypted
    key, a CA file without a certificate."""
    cert_pem, key_pem = _read_pem(cert, "--tls-cert"), _read_pem(key, "--tls-key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ValueError(f"--tls-cert {cert}: no certificate in it (no BEGIN CERTIFICATE line)")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ValueError(f"--tls-key {key}: no private key in it (no BEGIN ... PRIVATE KEY line)")
    if b"ENCRYPTED" in key_pem:
        raise ValueError(
            f"--tls-key {key}: the key is encrypted, and gRPC reads unencrypted keys only "
            "(keep it readable to the daemon alone: chmod 600, or systemd's LoadCredential=)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"--tls-key {key} is not the private key of --tls-cert {cert} (their public "
                "keys differ): give the key the certificate was issued for"
            ) from None
        raise ValueError(
            f"--tls-cert {cert} / --tls-key {key}: not a usable certificate and key: "
            f"{err.reason or err}"
        ) from None
    if client_ca is not None:
        _read_pem(client_ca, "--tls-client-ca")
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as err:
            raise ValueError(
                f"--tls-client-ca {client_ca}: no usable CA certificate in it ({err.reason or err})"
            ) from None


def _no_password() -> bytes:
    raise ValueError("an encrypted key")  # caught above; gRPC can't use one either


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed); it must not be empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as err:
        raise OSError(f"--auth-token-file {path}: cannot read it: {err.strerror or err}") from None
    if not token:
        raise ValueError(f"--auth-token-file {path}: the file is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--auth-token-file %s can be read by other users; chmod 600 it", path)
    return token


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token with UNAUTHENTICATED (see module doc)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_PREFIXES) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._token = token.encode("utf-8")
        self._open = open_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        return handler if problem is None else _refusing(handler, problem)

    def _problem(self, metadata: Any) -> str | None:
        """Why the call's metadata does not authenticate it; None when it does."""
        values = [value for key, value in metadata if key == "authorization"]
        return bearer_problem(self._token, values, "metadata")


def bearer_problem(token: bytes, values: Sequence[object], carrier: str) -> str | None:
    """Why the ``authorization`` values a call sent (gRPC metadata or HTTP headers, as
    ``carrier`` says) do not carry ``token``; None when they do. Compared in constant time."""
    if not values:
        return f"missing credentials: send {carrier} 'authorization: Bearer <token>'"
    value = values[0]
    if not isinstance(value, str) or value[: len(_BEARER)].lower() != _BEARER:
        return f"malformed authorization {carrier}: expected 'Bearer <token>'"
    offered = value[len(_BEARER) :].strip().encode("utf-8")
    if len(values) > 1 or not hmac.compare_digest(offered, token):
        return "invalid bearer token"
    return None


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that aborts with UNAUTHENTICATED without reading the request.

    It is always of a request-streaming kind: gRPC reads a streaming request only when the
    handler asks for its messages, and this one never does, whereas for a unary handler it
    would receive and deserialize the whole message first (up to --max-message-bytes of
    it, sent by anyone). On the wire a unary call and a one-message stream are the same, so
    the caller sees only the refusal.
    """
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator; abort always raises

    serializers = {
        "request_deserializer": _unread,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **serializers)
    return grpc.stream_unary_rpc_method_handler(unary, **serializers)


def _unread(data: bytes) -> None:
    """The refusing handlers' deserializer: never called, as they read no request."""
    raise AssertionError("an unauthenticated request was read")
