"""The Generator servicer: a thin translator, protobuf -> domain -> ``Frontend`` -> protobuf.

Errors are raised as LmserveError subclasses; the interceptor turns them into statuses. What
a request goes through (validation, tokenizing, grammar compiles, the scheduler, metrics) is
the ``Frontend``'s, shared with the HTTP API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
)
from lmserve_server.errors import InvalidArgumentError
from lmserve_server.frontend import Frontend
from lmserve_server.scheduling.batcher import Served

SERVICE_NAME = lmserve_pb2.DESCRIPTOR.services_by_name["Generator"].full_name

_FINISH_REASONS = {
    FinishReason.LENGTH: lmserve_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: lmserve_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: lmserve_pb2.FINISH_REASON_STOP,
}


class GeneratorService(lmserve_pb2_grpc.GeneratorServicer):
    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend
        self._engine = frontend.engine
        self._config = frontend.config

    async def Generate(
        self, request: lmserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> lmserve_pb2.GenerateResponse:
        gen_request = await self._frontend.build(request)
        return _to_response(gen_request, await self._frontend.generate(gen_request))

    async def GenerateStream(
        self, request: lmserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lmserve_pb2.GenerateStreamResponse]:
        received = time.perf_counter()  # time to first token counts from here
        gen_request = await self._frontend.build(request)
        sent_chars = sent_tokens = 0
        async for item in self._frontend.stream(gen_request, received):
            if isinstance(item, TextDelta):
                sent_chars += len(item.text)
                sent_tokens += len(item.token_ids)
                yield lmserve_pb2.GenerateStreamResponse(
                    text=item.text, token_ids=item.token_ids, logprobs=_logprobs(item.logprobs)
                )
                continue
            output = item.value
            yield lmserve_pb2.GenerateStreamResponse(
                text=output.text[sent_chars:],
                token_ids=output.token_ids[sent_tokens:],
                finish_reason=_FINISH_REASONS[output.finish_reason],
                logprobs=_logprobs(output.logprobs[sent_tokens:]),
                **_usage(gen_request, item),
            )

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
            self._frontend.tokenizer_pool, self._engine.tokenize, request.text
        )
        return lmserve_pb2.TokenizeResponse(token_ids=token_ids)

    async def GetModelInfo(
        self, request: lmserve_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> lmserve_pb2.ModelInfo:
        capacity = self._frontend.scheduler.capacity
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
