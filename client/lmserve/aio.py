"""``AsyncClient``: the asyncio twin of ``lmserve.Client`` (same constructor, same
methods, awaited), for backend services that run on asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from lmserve import health
from lmserve.client import USE_CLIENT_DEFAULT, Timeout, _Base
from lmserve.errors import UnavailableError, from_rpc_error
from lmserve.health import SERVICE
from lmserve.security import PemSource
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

__all__ = ["AsyncClient"]


class AsyncClient(_Base):
    """The asyncio twin of ``Client``: same constructor, same methods, awaited.

    Build it inside the event loop it will be used on (gRPC's asyncio channel binds to
    the running loop). Use ``async with``, or ``await close()``.
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

    async def generate(
        self,
        prompt: Prompt,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        **options: Unpack[GenerateOptions],
    ) -> GenerationResult:
        """The continuation of ``prompt``, once it is complete (see ``Client.generate``)."""
        request = build_request(prompt, **options)
        try:
            response = await self._stub.Generate(request, **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return result_from_proto(response)

    async def stream(
        self,
        prompt: Prompt,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        **options: Unpack[GenerateOptions],
    ) -> AsyncIterator[StreamChunk]:
        """The continuation of ``prompt`` as it is produced (``async for``); the last
        chunk has a ``finish_reason``. Leaving the loop early cancels the call."""
        request = build_request(prompt, **options)
        call = self._stub.GenerateStream(request, **self._call_kwargs(timeout))
        try:
            async for message in call:
                yield chunk_from_proto(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    async def tokenize(self, text: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[int]:
        """The token ids of ``text`` under the served model's tokenizer."""
        try:
            response = await self._stub.Tokenize(
                lmserve_pb2.TokenizeRequest(text=text), **self._call_kwargs(timeout)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return list(response.token_ids)

    async def model_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """The served model and the server's batching settings."""
        try:
            response = await self._stub.GetModelInfo(
                lmserve_pb2.GetModelInfoRequest(), **self._call_kwargs(timeout)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return model_info_from_proto(response)

    def _open_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=options)

    async def health(self, service: str = SERVICE, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The daemon's ``grpc.health.v1`` status of ``service`` (see ``Client.health``)."""
        channel = self._health_channel()
        try:
            return await health.check_async(channel, service, **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            await channel.close()

    async def wait_serving(self, timeout: float, *, service: str = SERVICE) -> None:
        """Wait until the daemon reports ``service`` SERVING (polling its health, also
        while its port is still closed); ``UnavailableError`` after ``timeout`` s."""
        channel = self._health_channel()
        try:
            await health.wait_until_serving_async(
                channel,
                timeout,
                service=service,
                target=self.target,
                metadata=self._metadata or None,
            )
        finally:
            await channel.close()

    def _health_channel(self) -> grpc.aio.Channel:
        # Not the calls' channel (see Client._health_channel).
        return self._open_channel([*self._user_options, *health.WAIT_CHANNEL_OPTIONS])

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel is connected; ``UnavailableError`` after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(f"{self.target} not ready after {timeout:g}s") from None

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
