"""``Client``: typed, blocking calls to an lmserve daemon (``lmserve.aio.AsyncClient`` is its
asyncio twin, built on the same ``_Base``).

Both own one gRPC channel, give every call the client's default timeout and metadata
unless told otherwise, return the dataclasses of ``lmserve.types`` and re-raise every
``grpc.RpcError`` as the matching ``lmserve.errors.LmserveError`` subclass. Request
building and response conversion live in ``types.py`` so the two twins only differ in
how they wait.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from lmserve import health
from lmserve.balancing import SERVICE, channel_options, resolve_target
from lmserve.errors import UnavailableError, from_rpc_error
from lmserve.security import PemSource, channel_credentials, token_metadata
from lmserve.types import (
    GenerateOptions,
    GenerationResult,
    ModelInfo,
    Prompt,
    StreamChunk,
    build_request,
    chunk_from_proto,
    model_info_from_proto,
    result_from_proto,
)
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc

if TYPE_CHECKING:  # typed keyword arguments; typing_extensions is not needed at run time
    from typing_extensions import Unpack

__all__ = ["USE_CLIENT_DEFAULT", "Client", "UseClientDefault"]


class UseClientDefault(enum.Enum):
    """Type of ``USE_CLIENT_DEFAULT``: a per-call ``timeout`` left at it means the
    client's own timeout, while ``None`` means no deadline at all."""

    USE_CLIENT_DEFAULT = enum.auto()


USE_CLIENT_DEFAULT = UseClientDefault.USE_CLIENT_DEFAULT

# What a per-call timeout may be: seconds, None (no deadline) or the client's default.
Timeout: TypeAlias = float | UseClientDefault | None


class _Base:
    """What the twins share: the target, the defaults and the per-call gRPC keywords."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None,
        options: Sequence[tuple[str, Any]],
        credentials: grpc.ChannelCredentials | None,
        metadata: Sequence[tuple[str, str]],
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | None = None,
        balance: bool = True,
        retries: int = 5,
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self._user_options = list(options)
        self._options = channel_options(options, balance=balance, retries=retries)
        self._credentials = channel_credentials(credentials, tls_ca, tls_cert, tls_key)
        self._metadata = token_metadata(metadata, token)

    def _call_kwargs(self, timeout: Timeout) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is USE_CLIENT_DEFAULT else timeout,
            # grpc wants None rather than an empty sequence when there is no metadata.
            "metadata": self._metadata or None,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout!r})"


class Client(_Base):
    """A blocking client for one lmserve daemon.

    ``target`` is a gRPC address such as ``"127.0.0.1:50051"``. ``timeout`` (seconds, None
    for no deadline) applies to every call unless the call passes its own; for ``stream``
    it bounds the whole stream. ``options`` are gRPC channel arguments, e.g.
    ``[("grpc.max_receive_message_length", 64 << 20)]``; with ``credentials`` the channel
    is a TLS one. ``metadata`` is sent with every call (e.g. an auth header).

    Security shortcuts (see ``lmserve.security``): ``tls_ca`` (a PEM path or bytes) makes
    the channel TLS, verifying the server with that CA; ``tls_cert`` + ``tls_key`` add a
    client certificate (mutual TLS); ``token`` sends ``authorization: Bearer <token>``.

    Replicas (``lmserve.balancing``): ``target`` may also be a DNS name resolving to several
    replicas (``"dns:///lmserve.default.svc:50051"``), an ``ipv4:a:p,b:p`` list, or a list of
    ``ip:port`` strings. Calls are spread with gRPC's round_robin, replicas that are not
    SERVING get none (client-side health checking), and UNAVAILABLE is retried up to
    ``retries`` attempts. ``balance=False`` leaves gRPC's defaults (pick_first, no retries).

    Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | None = None,
        balance: bool = True,
        retries: int = 5,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            options=options,
            credentials=credentials,
            metadata=metadata,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            token=token,
            balance=balance,
            retries=retries,
        )
        self._channel = self._open_channel(self._options)
        self._stub = lmserve_pb2_grpc.GeneratorStub(self._channel)

    def _open_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, self._credentials, options=options)

    def generate(
        self,
        prompt: Prompt,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        **options: Unpack[GenerateOptions],
    ) -> GenerationResult:
        """The continuation of ``prompt`` (text, token ids, or a conversation: a list of
        ``ChatMessage``), once it is complete.

        ``options`` are ``GenerateOptions``: ``max_new_tokens=0`` means the server's default;
        arguments left at None are not sent (greedy decoding unless ``temperature`` > 0);
        ``structured_output=JsonSchema(...)`` (or ``JsonObject()``, ``Regex``, ``Choice``,
        ``Grammar``) constrains the continuation's format.
        """
        request = build_request(prompt, **options)
        try:
            response = self._stub.Generate(request, **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return result_from_proto(response)

    def stream(
        self,
        prompt: Prompt,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[StreamChunk]:
        """The continuation of ``prompt`` as it is produced; the last chunk has a
        ``finish_reason``. The call starts on the first ``next()``; errors are raised from
        the iteration. Leaving the loop early cancels the call on the server.
        """
        request = build_request(prompt, **options)
        return self._stream(request, timeout)

    def _stream(
        self, request: lmserve_pb2.GenerateRequest, timeout: Timeout
    ) -> Iterator[StreamChunk]:
        call = self._stub.GenerateStream(request, **self._call_kwargs(timeout))
        try:
            for message in call:
                yield chunk_from_proto(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            # A no-op when the stream ended; when the consumer stopped early (break,
            # exception, garbage collection) it tells the server to stop generating.
            call.cancel()

    def tokenize(self, text: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[int]:
        """The token ids of ``text`` under the served model's tokenizer."""
        try:
            response = self._stub.Tokenize(
                lmserve_pb2.TokenizeRequest(text=text), **self._call_kwargs(timeout)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return list(response.token_ids)

    def model_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """The served model and the server's batching settings."""
        try:
            response = self._stub.GetModelInfo(
                lmserve_pb2.GetModelInfoRequest(), **self._call_kwargs(timeout)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return model_info_from_proto(response)

    def health(self, service: str = SERVICE, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The daemon's ``grpc.health.v1`` status of ``service`` by name: ``"SERVING"``
        once the model is loaded and warm, ``"NOT_SERVING"`` while it drains; a failed check
        raises (``UnavailableError`` when nobody listens)."""
        with self._health_channel() as channel:
            try:
                return health.check(channel, service, **self._call_kwargs(timeout))
            except grpc.RpcError as e:
                raise from_rpc_error(e) from e

    def wait_serving(self, timeout: float, *, service: str = SERVICE) -> None:
        """Block until the daemon reports ``service`` SERVING (polling its health, also
        while its port is still closed); ``UnavailableError`` after ``timeout`` s."""
        with self._health_channel() as channel:
            health.wait_until_serving(
                channel,
                timeout,
                service=service,
                target=self.target,
                metadata=self._metadata or None,
            )

    def _health_channel(self) -> grpc.Channel:
        # Not the calls' channel: its client-side health checking would show a daemon that
        # is not SERVING as UNAVAILABLE, and its reconnect backoff grows to minutes.
        return self._open_channel([*self._user_options, *health.WAIT_CHANNEL_OPTIONS])

    def wait_ready(self, timeout: float) -> None:
        """Block until the channel is connected; ``UnavailableError`` after ``timeout`` s.

        This only checks the transport: a daemon still loading its model may accept
        connections before it can serve.
        """
        future = grpc.channel_ready_future(self._channel)
        try:
            future.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            # Otherwise the future keeps watching the channel's state after we gave up.
            future.cancel()
            raise UnavailableError(f"{self.target} not ready after {timeout:g}s") from None

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
