"""The OpenAI-compatible HTTP API (``--http-port``): a Starlette app served by uvicorn on
the daemon's own event loop, beside the gRPC server.

It only translates: a body is parsed (``openai_api.py``), each choice becomes a
``GenerateRequest`` message, and the ``Frontend`` the gRPC servicer calls validates it, queues
it on the same scheduler and runs it; the result is written back as OpenAI's JSON, or as
server-sent events ending in ``data: [DONE]``. The daemon's errors become OpenAI's error body
with the status that fits (``HTTP_STATUSES``, the counterpart of the gRPC status table). The
bearer token of ``--auth-token-file`` is checked before the body is read (``/health`` stays
open), and a body over ``--max-message-bytes`` is refused unread (413). Without a
``--metrics-port``, the port also serves Prometheus' ``/metrics`` (behind the token too). A
caller that disconnects cancels its request, unary or streamed, as a cancelled gRPC call
does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmserve_server import openai_api
from lmserve_server.engine.types import GenerationOutput, GenerationRequest, TextDelta
from lmserve_server.errors import (
    GenerationFailedError,
    InvalidArgumentError,
    LmserveError,
    ModelLoadError,
    OutOfMemoryError,
    QueueFullError,
    ShuttingDownError,
    shutting_down,
)
from lmserve_server.frontend import Frontend
from lmserve_server.network import grpc_address
from lmserve_server.scheduling.batcher import Served
from lmserve_server.security import bearer_problem

log = logging.getLogger(__name__)

# The daemon's errors as HTTP statuses and OpenAI error types (interceptors.STATUS_CODES is
# the gRPC side of the same table).
HTTP_STATUSES: dict[type[LmserveError], tuple[int, str]] = {
    InvalidArgumentError: (400, "invalid_request_error"),
    QueueFullError: (429, "rate_limit_error"),
    OutOfMemoryError: (500, "server_error"),
    ShuttingDownError: (503, "service_unavailable"),
    ModelLoadError: (500, "server_error"),
    GenerationFailedError: (500, "server_error"),
}


class ApiError(Exception):
    """An HTTP-level refusal (auth, size, unknown model) in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, kind: str, code: str | None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def error_body(message: str, kind: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _lmserve_error(err: LmserveError, chat: bool) -> tuple[int, dict[str, Any]]:
    status, kind = next(
        (HTTP_STATUSES[cls] for cls in type(err).__mro__ if cls in HTTP_STATUSES),
        (500, "server_error"),
    )
    param = openai_api.param_of(str(err), chat) if status == 400 else None
    return status, error_body(str(err), kind, None, param)


class HttpApi:
    """The app and its uvicorn server; ``start`` binds, ``stop`` closes after the drain."""

    def __init__(
        self,
        frontend: Frontend,
        auth_token: str | None,
        model_name: str,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self._frontend = frontend
        self._metrics = metrics
        self._token = auth_token.encode("utf-8") if auth_token is not None else None
        self.model_name = model_name
        self._created = int(time.time())
        self.draining = False
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                *([Route("/metrics", self._scrape, methods=["GET"])] if metrics else []),
            ],
            exception_handlers={HTTPException: _http_exception},  # type: ignore[dict-item]
        )

    # The server.

    async def start(self, host: str, port: int, tls: TlsFiles | None) -> int:
        """Serves on ``host:port`` (0: any free port) and returns the port."""
        sock = _listen(host, port)
        # uvicorn's start-up lines ("Started server process") would say what the daemon's
        # own "serving ... and HTTP ..." line says; its warnings and errors still show.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            **(tls.uvicorn_options() if tls else {}),
        )
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it (a bad certificate, say)
                raise OSError(f"--http-port {port}: the HTTP server stopped at its start")
            await asyncio.sleep(0.01)
        bound: int = sock.getsockname()[1]
        return bound

    async def stop(self, grace: float) -> None:
        """Closes the port and gives open connections ``grace`` seconds to finish (the
        drain is over: what was accepted is done, or given up)."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, round(grace))
        self._server.should_exit = True
        await self._task

    # The routes.

    async def _health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "serving"})

    async def _scrape(self, request: Request) -> Response:
        return await self._answer(request, chat=False, handle=self._metrics_text)

    async def _metrics_text(self, request: Request) -> Response:
        assert self._metrics is not None
        text = await asyncio.to_thread(generate_latest, self._metrics)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def _models(self, request: Request) -> Response:
        return await self._answer(request, chat=False, handle=self._list_models)

    async def _list_models(self, request: Request) -> Response:
        engine = self._frontend.engine
        model = {
            "id": self.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "lmserve",
            "root": engine.name,
            "max_model_len": engine.max_context,
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def _completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False, handle=self._complete)

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True, handle=self._complete_chat)

    async def _answer(
        self, request: Request, chat: bool, handle: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """``handle``'s response, or the error it raised in OpenAI's shape."""
        try:
            self._authorize(request)
            return await handle(request)
        except ApiError as err:
            body = error_body(str(err), err.kind, err.code, err.param)
            return JSONResponse(body, status_code=err.status)
        except LmserveError as err:
            status, body = _lmserve_error(err, chat)
            return JSONResponse(body, status_code=status)
        except Exception as err:  # unforeseen: logged with its traceback, as gRPC's INTERNAL
            log.exception("%s %s failed", request.method, request.url.path)
            message = f"internal error: {type(err).__name__}: {err}"
            return JSONResponse(error_body(message, "server_error", None, None), status_code=500)

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        problem = bearer_problem(self._token, request.headers.getlist("authorization"), "header")
        if problem is not None:
            raise ApiError(401, problem, "invalid_request_error", "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) past the size limit without reading the rest."""
        limit = self._frontend.config.max_message_bytes
        too_large = ApiError(
            413,
            f"request body: more than {limit} bytes (--max-message-bytes)",
            "invalid_request_error",
            "request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; this server serves {self.model_name!r}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    async def _complete(self, request: Request) -> Response:
        received = time.perf_counter()
        body = openai_api.parse(openai_api.CompletionRequest, await self._body(request))
        self._check_model(body.model)
        prompts = openai_api.completion_messages(body)
        openai_api.check_choices(body, len(prompts), self._frontend.config.max_batch_size)
        built = [await self._frontend.build(message) for message in prompts]
        return await self._respond(request, body, built, received, _CompletionFormat(self))

    async def _complete_chat(self, request: Request) -> Response:
        received = time.perf_counter()
        body = openai_api.parse(openai_api.ChatCompletionRequest, await self._body(request))
        self._check_model(body.model)
        message = openai_api.chat_message(body)
        openai_api.check_choices(body, 1, self._frontend.config.max_batch_size)
        built = [await self._frontend.build(message)]
        return await self._respond(request, body, built, received, _ChatFormat(self))

    async def _respond(
        self,
        request: Request,
        body: Any,
        prompts: list[GenerationRequest],
        received: float,
        fmt: _Format,
    ) -> Response:
        choices = [_with_seed(prompt, body.seed, i) for prompt in prompts for i in range(body.n)]
        if body.stream:
            if self.draining:  # a stream's status goes out before its requests are submitted
                raise shutting_down()
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(choices, body.n, received, fmt, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
            )
        runs = [asyncio.ensure_future(self._frontend.generate(choice)) for choice in choices]
        served = await _unless_disconnected(request, runs)
        if served is None:  # nobody to answer; nginx's "client closed request"
            return Response(status_code=499)
        return JSONResponse(fmt.response(choices, served, body.n))

    async def _events(
        self,
        choices: list[GenerationRequest],
        n: int,
        received: float,
        fmt: _Format,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        streams = [self._frontend.stream(choice, received) for choice in choices]
        served: list[Served[GenerationOutput] | None] = [None] * len(choices)
        sent: dict[int, tuple[int, int]] = {}  # per choice: characters and tokens sent
        try:
            for index in range(len(choices) if fmt.chat else 0):  # the role comes first
                yield _event(fmt.chunk(index, first=True, include_usage=include_usage))
            async for index, item in _merged(streams):
                chars, tokens = sent.get(index, (0, 0))
                if isinstance(item, TextDelta):
                    sent[index] = (chars + len(item.text), tokens + len(item.token_ids))
                    if item.text or item.token_ids:
                        yield _event(
                            fmt.chunk(
                                index,
                                text=item.text,
                                logprobs=item.logprobs,
                                offset=chars,
                                include_usage=include_usage,
                            )
                        )
                    continue
                served[index] = item
                output = item.value
                yield _event(
                    fmt.chunk(
                        index,
                        text=output.text[chars:],
                        logprobs=output.logprobs[tokens:],
                        offset=chars,
                        finish_reason=openai_api.FINISH_REASONS[output.finish_reason],
                        include_usage=include_usage,
                    )
                )
            if include_usage:
                done = [s for s in served if s is not None]
                yield _event(fmt.usage_chunk(_usage(choices, done, n)))
        except LmserveError as err:  # after the 200 went out: the error is the last event
            yield _event(_lmserve_error(err, fmt.chat)[1])
        finally:
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"

    def token_text(self, token_id: int) -> str:
        return str(self._frontend.engine.tokenizer.decode([token_id]))


def _with_seed(request: GenerationRequest, seed: int | None, choice: int) -> GenerationRequest:
    """Choice ``choice`` of a request: sampled with ``seed + choice`` (vLLM's rule), so the
    choices differ and each can be reproduced alone."""
    if seed is None or choice == 0:
        return request
    return replace(request, sampling=replace(request.sampling, seed=(seed + choice) % 2**64))


async def _unless_disconnected(
    request: Request, runs: Sequence[asyncio.Future[Served[GenerationOutput]]]
) -> list[Served[GenerationOutput]] | None:
    """The runs' results, or None when the client disconnected first: that cancels them all
    (their rows stop and free their KV), as does a run that fails (its error is raised)."""
    everything = asyncio.gather(*runs)
    disconnect: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((everything, disconnect), return_when=asyncio.FIRST_COMPLETED)
        if not everything.done():
            everything.cancel()
            return None
        return list(everything.result())
    finally:
        disconnect.cancel()
        for run in runs:
            run.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read: the next message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(
    streams: Sequence[AsyncIterator[TextDelta | Served[GenerationOutput]]],
) -> AsyncIterator[tuple[int, TextDelta | Served[GenerationOutput]]]:
    """Each stream's items tagged with its index, as they come; the first error ends all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, finished))
        except Exception as err:
            await queue.put((index, err))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        # Each stream's own clean-up (cancelling its request) runs as its pump stops.
        await asyncio.gather(*pumps, return_exceptions=True)


def _usage(
    choices: Sequence[GenerationRequest], served: Sequence[Served[GenerationOutput]], n: int
) -> dict[str, Any]:
    """Usage as OpenAI counts it: each prompt once (its first choice's cached tokens), every
    choice's completion."""
    firsts = served[::n]
    return openai_api.usage(
        prompt_tokens=sum(len(c.prompt_ids) for c in choices[::n]),
        completion_tokens=sum(len(s.value.token_ids) for s in served),
        cached_tokens=sum(s.value.cached_prompt_tokens for s in firsts),
    )


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class _Format:
    """How one API writes its responses and stream chunks."""

    chat = False
    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, api: HttpApi) -> None:
        self._api = api
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self._api.model_name,
        }

    def response(
        self,
        requests: Sequence[GenerationRequest],
        served: Sequence[Served[GenerationOutput]],
        n: int,
    ) -> dict[str, Any]:
        choices = [self.choice(i, s.value) for i, s in enumerate(served)]
        usage = _usage(requests, served, n)
        return {**self._head(self.object_name), "choices": choices, "usage": usage}

    def choice(self, index: int, output: GenerationOutput) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(
        self,
        index: int,
        *,
        include_usage: bool,
        first: bool = False,
        text: str = "",
        logprobs: Sequence[Any] = (),
        offset: int = 0,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        chunk = {**self._head(self.chunk_name), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head(self.chunk_name), "choices": [], "usage": usage}


class _CompletionFormat(_Format):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def choice(self, index: int, output: GenerationOutput) -> dict[str, Any]:
        return {
            "index": index,
            "text": output.text,
            "logprobs": self._logprobs(output.logprobs, 0) if output.logprobs else None,
            "finish_reason": openai_api.FINISH_REASONS[output.finish_reason],
        }

    def _logprobs(self, logprobs: Sequence[Any], offset: int) -> dict[str, Any]:
        return openai_api.completion_logprobs(logprobs, self._api.token_text, offset)

    def chunk(
        self,
        index: int,
        *,
        include_usage: bool,
        first: bool = False,
        text: str = "",
        logprobs: Sequence[Any] = (),
        offset: int = 0,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(logprobs, offset) if logprobs else None,
            "finish_reason": finish_reason,
        }
        return self._chunk(choice, include_usage)


class _ChatFormat(_Format):
    chat = True
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, index: int, output: GenerationOutput) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": output.text},
            "logprobs": self._logprobs(output.logprobs) if output.logprobs else None,
            "finish_reason": openai_api.FINISH_REASONS[output.finish_reason],
        }

    def _logprobs(self, logprobs: Sequence[Any]) -> dict[str, Any]:
        return openai_api.chat_logprobs(logprobs, self._api.token_text)

    def chunk(
        self,
        index: int,
        *,
        include_usage: bool,
        first: bool = False,
        text: str = "",
        logprobs: Sequence[Any] = (),
        offset: int = 0,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": finish_reason,
        }
        return self._chunk(choice, include_usage)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(
        error_body(message, kind, None, None), status_code=exc.status_code, headers=exc.headers
    )


class TlsFiles:
    """The daemon's ``--tls-*`` files, as uvicorn takes them."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=self.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: SIGTERM starts the daemon's drain
    (cli.py), which stops this server once the accepted requests are done."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (an IPv6 address too), without SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as err:
        raise OSError(
            f"--http-port {port}: cannot listen on {grpc_address(host, port)}: "
            f"{err.strerror or err}"
        ) from None
    sock.setblocking(False)
    return sock
