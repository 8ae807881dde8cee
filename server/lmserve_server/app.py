"""The daemon: wires engine, batcher and servicer into a grpc.aio server with health and
reflection, and drains it on shutdown.

``Daemon(config, engine).start()`` binds (port 0 picks a free port, as tests do) and returns
the port; ``stop()`` turns health NOT_SERVING, stops accepting, lets every accepted request
finish within the drain timeout, then closes the batcher.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmserve.v1 import lmserve_pb2_grpc
from lmserve_server.batcher import MicroBatcher
from lmserve_server.config import ServerConfig
from lmserve_server.engine import Engine
from lmserve_server.interceptors import ErrorInterceptor
from lmserve_server.service import SERVICE_NAME, GeneratorService
from lmserve_server.types import GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Daemon:
    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        # One thread: generate calls run one at a time, off the event loop, so the loop
        # keeps accepting requests while the model works.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-engine")
        self.batcher: MicroBatcher[GenerationRequest, GenerationOutput] = MicroBatcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
        )
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _run_batch(self, batch: list[GenerationRequest]) -> list[GenerationOutput]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.generate_batch, batch)

    async def start(self) -> int:
        """Binds, starts serving and reports SERVING; the engine must be loaded (and warm)."""
        # Both belong to the running event loop, so they are made here, not in __init__.
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor(f"/{SERVICE_NAME}/")])
        lmserve_pb2_grpc.add_GeneratorServicer_to_server(
            GeneratorService(self.engine, self.batcher, self.config), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        address = f"{self.config.host}:{self.config.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.batcher.start()
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _SERVING)
        log.info("serving %s on %s:%d", self.engine.name, self.config.host, self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING at once, no new calls, accepted calls finish, then exit."""
        grace = self.config.drain_timeout_s if grace is None else grace
        log.info("draining (up to %.1f s)", grace)
        assert self.server is not None and self.health is not None, "stop() before start()"
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.batcher.close(drain=True)
        self._executor.shutdown(wait=True)
        log.info("stopped")
