"""How a client proves who it talks to and who it is: TLS, mutual TLS and a bearer token.

``channel_credentials`` turns the ``tls_ca``/``tls_cert``/``tls_key`` arguments of the
clients (file paths or PEM bytes) into gRPC channel credentials, or passes an explicit
``credentials`` through. ``token_metadata`` adds ``authorization: Bearer <token>`` to the
metadata sent with every call (plain metadata, so it also works on a plaintext loopback
channel, where gRPC refuses call credentials).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeAlias

import grpc

# A PEM file's path, or its contents.
PemSource: TypeAlias = "str | os.PathLike[str] | bytes"


def _pem(source: PemSource | None, name: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{name}: cannot read {os.fspath(source)!r}: {err.strerror}") from None


def channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    tls_ca: PemSource | None = None,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
) -> grpc.ChannelCredentials | None:
    """The channel's credentials; None means a plaintext channel.

    Any of ``tls_*`` makes the channel a TLS one: ``tls_ca`` verifies the server (the system
    roots when omitted), ``tls_cert`` + ``tls_key`` are the client's certificate for mutual
    TLS. They cannot be mixed with explicit ``credentials``.
    """
    if tls_ca is None and tls_cert is None and tls_key is None:
        return credentials
    if credentials is not None:
        raise ValueError("pass either credentials or tls_ca/tls_cert/tls_key, not both")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "tls_ca"),
        private_key=_pem(tls_key, "tls_key"),
        certificate_chain=_pem(tls_cert, "tls_cert"),
    )


def token_metadata(
    metadata: Sequence[tuple[str, str]], token: str | None
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the bearer token's ``authorization`` entry when there is a token."""
    if token is None:
        return tuple(metadata)
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("token must be a non-empty string without whitespace")
    return (*metadata, ("authorization", f"Bearer {token}"))
