"""``lmserve-client --wait`` and ``lmserve-client health``: the client's grpc.health.v1 checks,
against real servers on loopback.

``--wait`` must cover both ways a daemon is not ready yet: its port still closed (it binds
only once the model is loaded) and a health service that says NOT_SERVING; and it must give
up after its time with one line and exit code 1, never hang.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lmserve import AsyncClient, Client, LmserveError, UnavailableError, cli
from lmserve import health as client_health
from tests.conftest import RunningDaemon
from tests.ops_support import free_port

GENERATOR = "lmserve.v1.Generator"


def test_the_hand_built_messages_match_grpc_health_on_the_wire() -> None:
    ours = client_health.HealthCheckRequest(service=GENERATOR).SerializeToString()
    assert ours == health_pb2.HealthCheckRequest(service=GENERATOR).SerializeToString()
    for name, status in health_pb2.HealthCheckResponse.ServingStatus.items():
        wire = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        reply = client_health.HealthCheckResponse.FromString(wire)
        assert client_health.STATUS_NAMES[reply.status] == name


# Run where the daemon's packages can't be imported, as in a client-only install.
WITHOUT_SERVER_PACKAGES = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"grpc_health", "grpc_reflection", "torch", "transformers"}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Refuse())
import lmserve.cli, lmserve.health
lmserve.health.HealthCheckRequest(service="x").SerializeToString()
lmserve.cli.build_parser().parse_args(["health", "--wait", "1"])
"""


def test_the_client_needs_no_grpc_health_package() -> None:
    subprocess.run([sys.executable, "-c", WITHOUT_SERVER_PACKAGES], check=True, timeout=120)


def test_health_prints_serving_and_exits_0(
    daemon: RunningDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["health", "--target", daemon.address]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert cli.main(["health", "--target", daemon.address, "--service", ""]) == 0
    # A service the daemon does not serve: the health service answers NOT_FOUND.
    assert cli.main(["health", "--target", daemon.address, "--service", "no.Such"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    with Client(daemon.address) as client:
        assert client.health() == "SERVING"

    async def asynchronously() -> tuple[str, str]:
        async with AsyncClient(daemon.address) as client:
            await client.wait_serving(60)
            return await client.health(), await client.health("")

    assert asyncio.run(asynchronously()) == ("SERVING", "SERVING")


@pytest.fixture
def switchable_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server whose only service is grpc.health.v1, NOT_SERVING until told."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set(GENERATOR, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_health_exits_1_while_not_serving_and_wait_waits_for_serving(
    switchable_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    address, servicer = switchable_server
    assert cli.main(["health", "--target", address]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    # --wait waits for the service asked about: the server as a whole ("") is SERVING.
    assert cli.main(["health", "--target", address, "--service", "", "--wait", "60"]) == 0
    assert capsys.readouterr().out == "SERVING\n"

    waited = threading.Event()

    def wait() -> int:
        code = cli.main(["health", "--target", address, "--wait", "300"])
        waited.set()
        return code

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(wait)
        # The port is open all along: only the status says it is not ready.
        assert not waited.wait(1.0), "returned while the server said NOT_SERVING"
        servicer.set(GENERATOR, health_pb2.HealthCheckResponse.SERVING)
        assert result.result(timeout=120) == 0
    assert capsys.readouterr().out.endswith("SERVING\n")


def test_wait_covers_a_daemon_that_is_not_listening_yet(
    make_daemon,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    with ThreadPoolExecutor(1) as pool:
        # Started before anything listens on the port, as after `lmserve serve &`.
        tokenize = pool.submit(
            cli.main,
            ["tokenize", "Hello World", "--target", f"127.0.0.1:{port}", "--wait", "300"],
        )
        time.sleep(0.5)
        assert not tokenize.done(), "gave up before the daemon started"
        running: RunningDaemon = make_daemon(port=port)
        assert running.port == port
        assert tokenize.result(timeout=300) == 0
    assert capsys.readouterr().out == "15496 2159\n"


def test_wait_gives_up_with_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"  # nobody listens
    started = time.monotonic()
    assert cli.main(["info", "--target", target, "--wait", "1"]) == 1
    assert time.monotonic() - started >= 1.0, "it must try for the whole second"
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: UNAVAILABLE: {target} not SERVING for {GENERATOR} after 1s")
    assert "Connection refused" in err  # what the last check saw
    with Client(target) as client, pytest.raises(UnavailableError, match="not SERVING"):
        client.wait_serving(0.2)


def test_wait_must_be_a_non_negative_number(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["info", "--wait", bad])
        assert exit_.value.code == 2
        assert "--wait" in capsys.readouterr().err


def test_the_async_client_waits_for_serving_and_gives_up_as_the_blocking_one_does(
    switchable_server: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = switchable_server
    nobody = f"127.0.0.1:{free_port()}"

    async def scenario() -> None:
        async with AsyncClient(address) as client:
            assert await client.health() == "NOT_SERVING"
            waiting = asyncio.ensure_future(client.wait_serving(300))
            await asyncio.sleep(1.0)
            assert not waiting.done(), "returned while the server said NOT_SERVING"
            servicer.set(GENERATOR, health_pb2.HealthCheckResponse.SERVING)
            await asyncio.wait_for(waiting, 120)
            assert await client.health() == "SERVING"
            with pytest.raises(LmserveError) as not_found:
                await client.health("no.Such")
            assert not_found.value.code is grpc.StatusCode.NOT_FOUND
        async with AsyncClient(nobody) as client:
            started = time.monotonic()
            with pytest.raises(UnavailableError, match=f"{nobody} not SERVING .* after 0.5s"):
                await client.wait_serving(0.5)
            assert time.monotonic() - started >= 0.5
            with pytest.raises(UnavailableError):
                await client.health(timeout=5)

    asyncio.run(scenario())
