"""The Generator servicer: a thin translator, protobuf -> domain -> await scheduler -> protobuf.

Errors are raised as LmserveError subclasses; the interceptor turns them into statuses.
Tokenizing (Tokenize, and a prompt's validation) runs on a small worker pool of its own,
never on the event loop (a 100k-character prompt takes ~0.2 s to tokenize, and health checks
must answer meanwhile) nor on the engine thread (reserved for torch); so does rendering chat
messages. A request's structured_output is compiled (``grammar.compiler``, threads of its
own) before the request is submitted: it waits for its grammar without holding a batch row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from typing import Any

import grpc

from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.chat import ChatRenderer
from lmserve_server.config import ServerConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
)
from lmserve_server.errors import InvalidArgumentError
from lmserve_server.grammar.compiler import GrammarCompiler
from lmserve_server.metrics import Metrics
from lmserve_server.scheduling.base import Scheduler
from lmserve_server.scheduling.batcher import Served
from lmserve_server.validation import RequestLimits, build_generation_request, grammar_spec

# Prompts up to this many characters are tokenized on the event loop, longer ones on the
# tokenizer pool (about 0.25 ms per thousand characters for GPT-2's tokenizer).
INLINE_TOKENIZE_CHARS = 1024

SERVICE_NAME = lmserve_pb2.DESCRIPTOR.services_by_name["Generator"].full_name

_FINISH_REASONS = {
    FinishReason.LENGTH: lmserve_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: lmserve_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: lmserve_pb2.FINISH_REASON_STOP,
}


class GeneratorService(lmserve_pb2_grpc.GeneratorServicer):
    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        config: ServerConfig,
        tokenizer_pool: Executor,
        metrics: Metrics,
        grammars: GrammarCompiler,
        chat: ChatRenderer,
    ) -> None:
        self._engine = engine
        self._scheduler = scheduler
        self._config = config
        self._tokenizer_pool = tokenizer_pool
        self._metrics = metrics
        self._grammars = grammars
        self._chat = chat
        capacity = scheduler.capacity
        self._limits = RequestLimits(
            max_context=engine.max_context,
            max_new_tokens_cap=config.max_new_tokens_cap,
            default_max_new_tokens=config.default_max_new_tokens,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
            vocab_size=engine.vocab_size,
            max_prompt_chars=config.max_prompt_chars,
            request_tokens=capacity.request_tokens,
        )

    async def Generate(
        self, request: lmserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> lmserve_pb2.GenerateResponse:
        gen_request = await self._build(request)
        served = await self._scheduler.submit(gen_request)
        self._metrics.observe_served(len(gen_request.prompt_ids), served.queue_s)
        return _to_response(gen_request, served)

    async def GenerateStream(
        self, request: lmserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lmserve_pb2.GenerateStreamResponse]:
        received = time.perf_counter()  # time to first token counts from here
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[TextDelta | None] = asyncio.Queue()
        gen_request = await self._build(request)
        result = asyncio.ensure_future(
            # Called on the engine thread as the row's text settles.
            self._scheduler.submit(
                gen_request, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
            )
        )
        # Deltas are queued on the loop before the result is, so None comes last.
        result.add_done_callback(lambda _: deltas.put_nowait(None))
        sent_chars = sent_tokens = 0
        timing = _StreamTiming(self._metrics, received)
        try:
            while (delta := await deltas.get()) is not None:
                timing.sent(len(delta.token_ids))
                sent_chars += len(delta.text)
                sent_tokens += len(delta.token_ids)
                yield lmserve_pb2.GenerateStreamResponse(
                    text=delta.text,
                    token_ids=delta.token_ids,
                    logprobs=_logprobs(delta.logprobs),
                )
            served = await result
            output = served.value
            self._metrics.observe_served(len(gen_request.prompt_ids), served.queue_s)
            timing.sent(len(output.token_ids) - sent_tokens)
            yield lmserve_pb2.GenerateStreamResponse(
                text=output.text[sent_chars:],
                token_ids=output.token_ids[sent_tokens:],
                finish_reason=_FINISH_REASONS[output.finish_reason],
                logprobs=_logprobs(output.logprobs[sent_tokens:]),
                **_usage(gen_request, served),
            )
        finally:
            if not result.done():  # the client went away: stop spending work on its row
                result.cancel()

    async def _build(self, request: lmserve_pb2.GenerateRequest) -> GenerationRequest:
        # Refuse before spending any work (tokenizing) on a request that can't be queued.
        self._scheduler.check_room()
        spec = grammar_spec(request, self._limits)
        if len(request.prompt) <= INLINE_TOKENIZE_CHARS and not request.messages:
            # A short prompt tokenizes in well under a millisecond: a hop to a worker thread
            # (which must wait for a core the engine's threads keep busy) would only delay
            # the request's admission, a step's worth on a loaded CPU.
            built = build_generation_request(request, self._engine.tokenize, self._limits)
        else:
            built = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer_pool,
                build_generation_request,
                request,
                self._engine.tokenize,
                self._limits,
                self._chat.prompt,
            )
        if spec is None:
            return built
        # Compiled once the rest is known good; the request is not queued until it is.
        return dataclasses.replace(built, grammar=await self._grammars.compile(spec))

    async def Tokenize(
        self, request: lmserve_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> lmserve_pb2.TokenizeResponse:
        # The same limit as a prompt's: tokenizing 4 MB takes seconds of a worker.
        if len(request.text) > self._config.max_prompt_chars:
            raise InvalidArgumentError(
                f"text: {len(request.text)} characters, at most {self._config.max_prompt_chars} "
                "allowed (--max-prompt-chars)"
            )
        token_ids = await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_pool, self._engine.tokenize, request.text
        )
        return lmserve_pb2.TokenizeResponse(token_ids=token_ids)

    async def GetModelInfo(
        self, request: lmserve_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> lmserve_pb2.ModelInfo:
        capacity = self._scheduler.capacity
        info = lmserve_pb2.ModelInfo(
            model=self._engine.name,
            device=self._engine.device,
            dtype=self._engine.dtype,
            max_context=self._engine.max_context,
            eos_token_id=self._engine.eos_token_id,
            max_batch_size=self._config.max_batch_size,
            max_new_tokens_cap=self._config.max_new_tokens_cap,
            default_max_new_tokens=self._config.default_max_new_tokens,
            scheduler=capacity.scheduler,
            max_request_tokens=capacity.max_request_tokens,
            kv_cache_tokens=capacity.kv_cache_tokens,
            max_step_tokens=capacity.max_step_tokens,
            max_batch_tokens=capacity.max_batch_tokens,
            weights_format="gguf" if self._engine.gguf is not None else "transformers",
            gguf_file_type=self._engine.gguf.file_type if self._engine.gguf is not None else "",
        )
        if capacity.scheduler == "static":  # the continuous scheduler never waits to batch
            info.max_wait_ms = self._config.max_wait_ms
        return info


class _StreamTiming:
    """A stream's time to first token and inter-token latencies, as its caller sees them:
    each message's tokens arrive when the message is sent."""

    def __init__(self, metrics: Metrics, received: float) -> None:
        self._metrics = metrics
        self._previous = received
        self._first = True

    def sent(self, tokens: int) -> None:
        if tokens <= 0:
            return
        now = time.perf_counter()
        self._metrics.observe_stream_tokens(now - self._previous, tokens, first=self._first)
        self._previous, self._first = now, False


def _to_response(
    request: GenerationRequest, served: Served[GenerationOutput]
) -> lmserve_pb2.GenerateResponse:
    output = served.value
    return lmserve_pb2.GenerateResponse(
        text=output.text,
        token_ids=output.token_ids,
        finish_reason=_FINISH_REASONS[output.finish_reason],
        logprobs=_logprobs(output.logprobs),
        **_usage(request, served),
    )


def _usage(request: GenerationRequest, served: Served[GenerationOutput]) -> dict[str, Any]:
    """How a request was served: the fields a unary response and a stream's last share."""
    return {
        "prompt_tokens": len(request.prompt_ids),
        "completion_tokens": len(served.value.token_ids),
        "batch_size": served.batch_size,
        "queue_ms": served.queue_s * 1000.0,
        "compute_ms": served.compute_s * 1000.0,
        "cached_prompt_tokens": served.value.cached_prompt_tokens,
    }


def _logprobs(logprobs: Sequence[TokenLogprob]) -> list[lmserve_pb2.TokenLogprob]:
    return [
        lmserve_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[lmserve_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]
