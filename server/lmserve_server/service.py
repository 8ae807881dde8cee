"""The Generator servicer: a thin translator, protobuf -> domain -> await batcher -> protobuf.

Errors are raised as LmserveError subclasses; the interceptor turns them into statuses.
Tokenizing (Tokenize, and a prompt's validation) runs on a small worker pool of its own,
never on the event loop (a 100k-character prompt takes ~0.2 s to tokenize, and health checks
must answer meanwhile) nor on the engine thread (reserved for torch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.batcher import Served
from lmserve_server.config import ServerConfig
from lmserve_server.engine import Engine
from lmserve_server.errors import InvalidArgumentError, QueueFullError
from lmserve_server.metrics import Metrics
from lmserve_server.scheduler import Scheduler
from lmserve_server.streaming import TextDeltas
from lmserve_server.types import FinishReason, GenerationOutput, GenerationRequest, RowControl
from lmserve_server.validation import RequestLimits, build_generation_request

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
        batcher: Scheduler,
        config: ServerConfig,
        tokenizer_pool: Executor,
        metrics: Metrics,
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._config = config
        self._tokenizer_pool = tokenizer_pool
        self._metrics = metrics
        self._limits = RequestLimits(
            max_context=engine.max_context,
            max_new_tokens_cap=config.max_new_tokens_cap,
            default_max_new_tokens=config.default_max_new_tokens,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
            vocab_size=engine.vocab_size,
            max_prompt_chars=config.max_prompt_chars,
            max_batch_tokens=config.max_batch_tokens,
        )

    async def Generate(
        self, request: lmserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> lmserve_pb2.GenerateResponse:
        gen_request = await self._build(request, RowControl())
        served = await self._submit(gen_request)
        return _to_response(gen_request, served)

    async def GenerateStream(
        self, request: lmserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lmserve_pb2.GenerateStreamResponse]:
        received = time.perf_counter()  # time to first token counts from here
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        # Called on the engine thread for each new token of this row.
        control = RowControl(on_token=lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t))
        gen_request = await self._build(request, control)
        result = asyncio.ensure_future(self._submit(gen_request))
        # Tokens are queued on the loop before the batch's result is, so None comes last.
        result.add_done_callback(lambda _: tokens.put_nowait(None))
        deltas = TextDeltas(self._engine.decode, gen_request.stop)
        previous_at: float | None = None
        try:
            while (token := await tokens.get()) is not None:
                now = time.perf_counter()
                self._metrics.observe_stream_token(
                    now - (received if previous_at is None else previous_at), previous_at is None
                )
                previous_at = now
                text, token_ids = deltas.push(token)
                if text:
                    yield lmserve_pb2.GenerateStreamResponse(text=text, token_ids=token_ids)
            output = (await result).value
            text, token_ids = deltas.finish(output.text, output.token_ids)
            yield lmserve_pb2.GenerateStreamResponse(
                text=text, token_ids=token_ids, finish_reason=_FINISH_REASONS[output.finish_reason]
            )
        finally:
            if not result.done():  # the client went away: stop spending work on its row
                result.cancel()

    async def _build(
        self, request: lmserve_pb2.GenerateRequest, control: RowControl
    ) -> GenerationRequest:
        # Refuse before spending any work (tokenizing) on a request that can't be queued.
        if self._batcher.queue_depth >= self._config.max_queue:
            raise QueueFullError(
                f"queue is full: {self._batcher.queue_depth} requests waiting "
                f"(--max-queue {self._config.max_queue})"
            )
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_pool,
            build_generation_request,
            request,
            self._engine.tokenize,
            self._limits,
            control,
        )

    async def _submit(self, request: GenerationRequest) -> Served[GenerationOutput]:
        try:
            served = await self._batcher.submit(request)
            self._metrics.observe_served(len(request.prompt_ids), served.queue_s)
            return served
        except asyncio.CancelledError:
            # Cancelled or past its deadline: a queued row leaves the queue (the batcher),
            # a running row is marked finished at the next decode step (the engine).
            if request.control:
                request.control.cancel()
            raise

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
        return lmserve_pb2.ModelInfo(
            model=self._engine.name,
            device=self._engine.device,
            dtype=self._engine.dtype,
            max_context=self._engine.max_context,
            eos_token_id=self._engine.eos_token_id,
            max_batch_size=self._config.max_batch_size,
            max_wait_ms=self._config.max_wait_ms,
            max_new_tokens_cap=self._config.max_new_tokens_cap,
            default_max_new_tokens=self._config.default_max_new_tokens,
        )


def _to_response(
    request: GenerationRequest, served: Served[GenerationOutput]
) -> lmserve_pb2.GenerateResponse:
    output = served.value
    return lmserve_pb2.GenerateResponse(
        text=output.text,
        token_ids=output.token_ids,
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(output.token_ids),
        finish_reason=_FINISH_REASONS[output.finish_reason],
        batch_size=served.batch_size,
        queue_ms=served.queue_s * 1000.0,
        compute_ms=served.compute_s * 1000.0,
    )
