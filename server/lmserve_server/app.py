"""The daemon: wires engine, scheduler and servicer into a grpc.aio server with health and
reflection, and drains it on shutdown.

``Daemon(config, engine).start()`` binds (port 0 picks a free port, as tests do) and returns
the port; ``stop()`` turns health NOT_SERVING, stops accepting, lets every accepted request
finish within the drain timeout, then closes the scheduler, and says whether the engine
thread is idle (a step or batch that outlasts the drain is not waited for). Around the
servicer: the request
interceptor (request ids, per-call metrics, debug log), the bearer-token check when a token
is set, and the error interceptor; TLS when a certificate is set; Prometheus ``/metrics``
when a metrics port is set; the OpenAI-compatible HTTP API (``http_api.py``) beside the gRPC
server when an HTTP port is set, on the same frontend and scheduler. Each batch is timed,
counted and logged in ``_run_batch``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmserve.v1 import lmserve_pb2_grpc
from lmserve_server.chat import ChatRenderer, read_chat_template
from lmserve_server.config import ServerConfig
from lmserve_server.engine.model import Engine
from lmserve_server.engine.runner import CudaGraphCapture
from lmserve_server.engine.types import GenerationOutput
from lmserve_server.frontend import Frontend
from lmserve_server.grammar.compiler import GrammarCompiler
from lmserve_server.http_api import HttpApi, TlsFiles
from lmserve_server.interceptors import ErrorInterceptor, RequestInterceptor
from lmserve_server.metrics import Metrics
from lmserve_server.network import grpc_address, is_loopback
from lmserve_server.scheduling.base import Scheduler
from lmserve_server.scheduling.continuous import ContinuousScheduler
from lmserve_server.scheduling.static import StaticScheduler
from lmserve_server.scheduling.steps import StepSettings, capacity, prefix_capacity
from lmserve_server.security import TokenAuthInterceptor, server_credentials
from lmserve_server.service import SERVICE_NAME, GeneratorService

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_REPLY_FLUSH_S = 2.0
# After the drain timeout, how long the scheduler gets to fail what waits, and the server to
# send what is done, before the process leaves a busy engine thread behind.
_ABANDON_WAIT_S = 0.5
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def engine_thread() -> ThreadPoolExecutor:
    """The one thread that makes every torch call of a daemon: loading, warm-up, batches.

    PyTorch gives each OS thread that calls it its own OpenMP team. With two teams (say the
    model warmed up on one thread and served on another) there are more OpenMP threads than
    cores, OpenMP stops spinning between parallel regions and every small op of a decode step
    pays a wake-up: measured here as a slower daemon than the same engine in-process
    (benchmarks/threads.py).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-engine")


# Tokenizing threads, apart from the engine thread (torch) and the event loop (health):
# two, as TGI's validation workers; the tokenizer releases the GIL while it works.
TOKENIZER_WORKERS = 2


class Daemon:
    def __init__(
        self, config: ServerConfig, engine: Engine, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        # The engine thread: every torch call runs on it, off the event loop, so the loop
        # keeps accepting while the model works. Pass the one that loaded and warmed up the
        # model (see engine_thread()).
        self._executor = executor or engine_thread()
        self._tokenizer_pool = ThreadPoolExecutor(
            max_workers=TOKENIZER_WORKERS, thread_name_prefix="lmserve-tokenize"
        )
        self.scheduler: Scheduler
        cuda = engine.input_device.type == "cuda"
        step_graphs = CudaGraphCapture() if config.cuda_graphs and cuda else None
        if config.scheduler == "continuous":
            self.scheduler = ContinuousScheduler(
                engine,
                max_batch_size=config.max_batch_size,
                max_queue=config.max_queue,
                max_step_tokens=config.max_step_tokens,
                kv_cache_tokens=config.kv_cache_tokens,
                kv_cache_memory=config.kv_cache_memory,
                kv_cache_host_memory=config.kv_cache_host_memory,
                prefix_cache=config.prefix_cache,
                prefix_cache_tokens=config.prefix_cache_tokens,
                step_graphs=step_graphs,
                allow_eager_fallback=config.allow_eager_fallback,
                on_step=self._record_step,
                warm_up=config.warm_up,
                executor=self._executor,
            )
        else:
            steps = None
            if config.static_engine == "steps" or (config.static_engine == "auto" and cuda):
                kv_tokens = capacity(
                    engine,
                    config.max_batch_size,
                    config.kv_cache_tokens,
                    config.kv_cache_memory,
                    config.kv_cache_host_memory,
                )
                steps = StepSettings(
                    rows=config.max_batch_size,
                    kv_tokens=kv_tokens,
                    max_step_tokens=max(config.max_step_tokens, config.max_batch_size + 1),
                    step_graphs=step_graphs,
                    allow_eager_fallback=config.allow_eager_fallback,
                    warm_up=config.warm_up,
                    prefix_cache_tokens=prefix_capacity(
                        config.prefix_cache, config.prefix_cache_tokens, kv_tokens
                    ),
                )
            self.scheduler = StaticScheduler(
                engine,
                max_batch_size=config.max_batch_size,
                max_wait_s=config.max_wait_ms / 1000.0,
                max_queue=config.max_queue,
                max_batch_tokens=config.max_batch_tokens,
                group_similar=config.group_similar,
                on_batch=self._record_batch,
                warm_up=config.warm_up,
                steps=steps,
                executor=self._executor,
            )
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None
        self.http: HttpApi | None = None
        self.port = 0
        self.http_port = 0
        # Always recorded (cheap, and a registry per daemon); served only with a metrics port.
        self.metrics = Metrics(
            queue_depth=lambda: self.scheduler.queue_depth,
            kv_cache_blocks=lambda: self.scheduler.kv_cache_blocks,
            prefix_cache=lambda: self.scheduler.prefix_cache_stats,
            grammar_cache_bytes=lambda: self.grammars.cached_bytes,
        )
        self.metrics.set_model(engine.name, engine.device, engine.dtype)
        # Structured output's compiles, on threads of their own (grammar/compiler.py).
        self.grammars = GrammarCompiler(
            engine.tokenizer,
            model_vocab_size=engine.vocab_size,
            end_token_ids=engine.end_token_ids,
            timeout_s=config.grammar_compile_timeout_s,
            cache_size=config.grammar_cache_size,
            cache_bytes=config.grammar_cache_memory,
            mask_budget_s=config.grammar_mask_budget_ms / 1000.0,
            on_compile=self.metrics.observe_grammar_compile,
            on_hit=self.metrics.grammar_cache_hit,
        )
        template = read_chat_template(config.chat_template) if config.chat_template else None
        self.chat = ChatRenderer(engine.tokenizer, template, config.chat_special_tokens)

    def _record_step(self, rows: int, seconds: float, tokens: int, failed: bool) -> None:
        # In continuous mode a "batch" is one step (called on the engine thread).
        self.metrics.observe_batch(rows, seconds, tokens, failed=failed)
        # A line per step at debug only: steps come every few milliseconds, and at info they
        # would flood the journal. The fields are a static batch line's, so one jq filter
        # (select(.batch_size)) reads both.
        if log.isEnabledFor(logging.DEBUG):
            compute_ms = round(seconds * 1000.0, 3)
            log.debug(
                "step of %d %s %s in %.1f ms, %d tokens",
                rows,
                "row" if rows == 1 else "rows",
                "failed" if failed else "ran",
                compute_ms,
                tokens,
                extra={"batch_size": rows, "compute_ms": compute_ms, "tokens": tokens},
            )

    def _record_batch(
        self, size: int, compute_s: float, outcomes: list[GenerationOutput | Exception] | None
    ) -> None:
        compute_ms = round(compute_s * 1000.0, 3)
        if outcomes is None:
            self.metrics.observe_batch(size, compute_s, 0, failed=True)
            log.warning(
                "batch of %d failed after %.1f ms",
                size,
                compute_ms,
                extra={"batch_size": size, "compute_ms": compute_ms},
            )
            return
        tokens = sum(len(o.token_ids) for o in outcomes if isinstance(o, GenerationOutput))
        self.metrics.observe_batch(size, compute_s, tokens, failed=False)
        log.info(
            "batch of %d ran in %.1f ms, %d tokens",
            size,
            compute_ms,
            tokens,
            extra={"batch_size": size, "compute_ms": compute_ms, "tokens": tokens},
        )

    async def start(self) -> int:
        """Prepares (and warms up) the scheduler, binds, starts serving and reports SERVING; the
        engine must be loaded."""
        # Both belong to the running event loop, so they are made here, not in __init__.
        self.health = health.aio.HealthServicer()
        prefix = f"/{SERVICE_NAME}/"
        interceptors: list[grpc.aio.ServerInterceptor] = [RequestInterceptor(prefix, self.metrics)]
        if self.config.auth_token is not None:
            interceptors.append(TokenAuthInterceptor(self.config.auth_token))
        interceptors.append(ErrorInterceptor(prefix))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                # gRPC's default SO_REUSEPORT lets a second daemon on a taken port take
                # about half of the new connections; a taken port must be an error.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.frontend = Frontend(
            self.engine,
            self.scheduler,
            self.config,
            self._tokenizer_pool,
            self.metrics,
            self.grammars,
            self.chat,
        )
        lmserve_pb2_grpc.add_GeneratorServicer_to_server(
            GeneratorService(self.frontend), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        address = grpc_address(self.config.host, self.config.port)
        self.port = self._bind(self.server, address)
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        # The scheduler's buffers (the continuous KV cache) on the engine thread, before
        # anything is served: one that doesn't fit fails the start, not a request.
        await asyncio.get_running_loop().run_in_executor(self._executor, self.scheduler.prepare)
        self.scheduler.start()
        self.grammars.prepare()  # the tokenizer's index, on the compile threads meanwhile
        await self.server.start()
        if self.config.http_port:
            self.http_port = await self._start_http(self.frontend)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _SERVING)
        security = "mutual TLS" if self.config.tls_client_ca else "TLS" if self.config.tls else ""
        auth = "bearer token" if self.config.auth_token is not None else ""
        log.info(
            "serving %s on %s%s%s",
            self.engine.name,
            grpc_address(self.config.host, self.port),
            f" and HTTP {grpc_address(self.config.host, self.http_port)}" if self.http else "",
            f" ({', '.join(x for x in (security, auth) if x)})" if security or auth else "",
        )
        return self.port

    async def _start_http(self, frontend: Frontend) -> int:
        config = self.config
        self.http = HttpApi(
            frontend,
            config.auth_token,
            config.served_model_name or self.engine.name,
            # /metrics here too, unless it has a port of its own.
            metrics=None if config.metrics_port else self.metrics.registry,
        )
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
        return await self.http.start(config.host, config.http_port, tls)

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        config = self.config
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                credentials = server_credentials(
                    config.tls_cert, config.tls_key, config.tls_client_ca
                )
                return server.add_secure_port(address, credentials)
            port = server.add_insecure_port(address)
        except RuntimeError:  # gRPC says only "Failed to bind"; the usual cause is:
            raise OSError(
                f"--port {config.port}: cannot listen on {address}: it is in use, or not an "
                "address of this machine"
            ) from None
        if not is_loopback(config.host):
            if config.auth_token is not None:
                log.warning("the bearer token travels in clear text: set --tls-cert/--tls-key")
            else:
                log.warning(
                    "serving plaintext without a token on %s: anyone who can reach it can "
                    "call it; set --tls-cert/--tls-key and --auth-token-file, or keep the port "
                    "behind a firewall or network policy",
                    grpc_address(config.host, port),
                )
        return port

    async def stop(self, grace: float | None = None) -> bool:
        """Drains: NOT_SERVING at once, no new calls, accepted calls finish, then exit.

        Returns False when the engine thread was left busy: a batch (or decode step) still
        running once the drain timeout has passed can't be interrupted, and the process must
        not wait for it (see ``_ABANDON_WAIT_S``).
        """
        grace = self.config.drain_timeout_s if grace is None else grace
        log.info("draining (up to %.1f s)", grace)
        assert self.server is not None and self.health is not None, "stop() before start()"
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.draining = True
        # Accepted requests finish while new ones get UNAVAILABLE from the closed scheduler;
        # only then does the server stop. grpc's own grace would also wait for every health
        # Watch stream (client-side health checking keeps one open per client), which never
        # ends by itself, so a drain would always last the whole timeout.
        closing = asyncio.ensure_future(self.scheduler.close(drain=True))
        try:
            await asyncio.wait_for(asyncio.shield(closing), timeout=grace)
        except asyncio.TimeoutError:
            log.warning(
                "drain timeout (%.1f s) reached; stopping the requests still running or waiting",
                grace,
            )
            # Waiting requests fail at once; running ones stop at their next step (a step or
            # a batch's next token), their callers told the server shut down.
            dropping = asyncio.ensure_future(self.scheduler.close(drain=False))
            await asyncio.wait({closing, dropping}, timeout=_ABANDON_WAIT_S)
        engine_idle = closing.done()
        if not engine_idle:
            log.warning(
                "the engine is still busy after the drain timeout; exiting without waiting "
                "for its running requests"
            )
        # Replies already made still go out; with a busy engine, calls still waiting for it
        # are cancelled sooner.
        await self.server.stop(_REPLY_FLUSH_S if engine_idle else _ABANDON_WAIT_S)
        if self.http is not None:
            await self.http.stop(_REPLY_FLUSH_S if engine_idle else _ABANDON_WAIT_S)
        self._executor.shutdown(wait=engine_idle, cancel_futures=True)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.grammars.close()
        await asyncio.to_thread(self.metrics.close)
        log.info("stopped")
        return engine_idle
