"""What every protocol's handler calls to serve a generation: the gRPC servicer
(``service.py``) and the OpenAI-compatible HTTP API (``http_api.py``) alike.

``Frontend.build`` checks a ``GenerateRequest`` message (``validation.py``) and turns it into
an engine request, compiling its structured output; ``generate`` runs it on the scheduler,
``stream`` yields its text as it settles and then how it was served. Both record the same
metrics, and a caller that goes away (its task cancelled, its stream closed) cancels its
request wherever it is, its KV cache slot freed.

Tokenizing (a prompt's validation) runs on a small worker pool of its own, never on the event
loop (a 100k-character prompt takes ~0.2 s to tokenize, and health checks must answer
meanwhile) nor on the engine thread (reserved for torch); so does rendering chat messages. A
request's structured_output is compiled (``grammar.compiler``, threads of its own) before the
request is submitted: it waits for its grammar without holding a batch row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from lmserve.v1 import lmserve_pb2
from lmserve_server.chat import ChatRenderer
from lmserve_server.config import ServerConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.types import GenerationOutput, GenerationRequest, TextDelta
from lmserve_server.grammar.compiler import GrammarCompiler
from lmserve_server.metrics import Metrics
from lmserve_server.scheduling.base import Scheduler
from lmserve_server.scheduling.batcher import Served
from lmserve_server.validation import RequestLimits, build_generation_request, grammar_spec

# Prompts up to this many characters are tokenized on the event loop, longer ones on the
# tokenizer pool (about 0.25 ms per thousand characters for GPT-2's tokenizer).
INLINE_TOKENIZE_CHARS = 1024


class Frontend:
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
        self.engine = engine
        self.scheduler = scheduler
        self.config = config
        self.tokenizer_pool = tokenizer_pool
        self.metrics = metrics
        self._grammars = grammars
        self._chat = chat
        capacity = scheduler.capacity
        self.limits = RequestLimits(
            max_context=engine.max_context,
            max_new_tokens_cap=config.max_new_tokens_cap,
            default_max_new_tokens=config.default_max_new_tokens,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
            vocab_size=engine.vocab_size,
            max_prompt_chars=config.max_prompt_chars,
            request_tokens=capacity.request_tokens,
        )

    async def build(self, request: lmserve_pb2.GenerateRequest) -> GenerationRequest:
        """The engine request of ``request``, or InvalidArgumentError naming the field (and
        QueueFullError before any work when the queue has no room)."""
        self.scheduler.check_room()
        spec = grammar_spec(request, self.limits)
        if len(request.prompt) <= INLINE_TOKENIZE_CHARS and not request.messages:
            # A short prompt tokenizes in well under a millisecond: a hop to a worker thread
            # (which must wait for a core the engine's threads keep busy) would only delay
            # the request's admission, a step's worth on a loaded CPU.
            built = build_generation_request(request, self.engine.tokenize, self.limits)
        else:
            built = await asyncio.get_running_loop().run_in_executor(
                self.tokenizer_pool,
                build_generation_request,
                request,
                self.engine.tokenize,
                self.limits,
                self._chat.prompt,
            )
        if spec is None:
            return built
        # Compiled once the rest is known good; the request is not queued until it is.
        return dataclasses.replace(built, grammar=await self._grammars.compile(spec))

    async def generate(self, request: GenerationRequest) -> Served[GenerationOutput]:
        served = await self.scheduler.submit(request)
        self.metrics.observe_served(len(request.prompt_ids), served.queue_s)
        return served

    async def stream(
        self, request: GenerationRequest, received: float
    ) -> AsyncIterator[TextDelta | Served[GenerationOutput]]:
        """The request's deltas as its text settles, then how it was served (whose output
        is the whole continuation: what the deltas left unsent is its tail). ``received``
        (``time.perf_counter()``) is when the call came: time to first token counts from it,
        each item's tokens counted as sent when it is yielded."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[TextDelta | None] = asyncio.Queue()
        result = asyncio.ensure_future(
            # Called on the engine thread as the row's text settles.
            self.scheduler.submit(
                request, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
            )
        )
        # Deltas are queued on the loop before the result is, so None comes last.
        result.add_done_callback(lambda _: deltas.put_nowait(None))
        sent_tokens = 0
        timing = _StreamTiming(self.metrics, received)
        try:
            while (delta := await deltas.get()) is not None:
                timing.sent(len(delta.token_ids))
                sent_tokens += len(delta.token_ids)
                yield delta
            served = await result
            self.metrics.observe_served(len(request.prompt_ids), served.queue_s)
            timing.sent(len(served.value.token_ids) - sent_tokens)
            yield served
        finally:
            if not result.done():  # the caller went away: stop spending work on its row
                result.cancel()


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
