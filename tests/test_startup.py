"""How ``lmserve serve`` fails to start: one ``lmserve: error:`` line naming what is wrong,
a non-zero exit, and no model loaded in vain. Real processes, real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import RunningDaemon
from tests.ops_support import LMSERVE, ServeProcess, free_port


def serve(model: Path | str, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """``lmserve serve`` run to its end (it is expected to fail)."""
    return subprocess.run(
        [*LMSERVE, "serve", "--model", str(model), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lmserve: error: "), stderr
    return lines[0]


@contextmanager
def listener(port: int) -> Iterator[None]:
    """Another program listening on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


@contextmanager
def running_lmserve(model: Path, port: int) -> Iterator[None]:
    server = ServeProcess(model, "--port", str(port))
    try:
        server.wait_serving()
        yield
    finally:
        server.kill()


@pytest.mark.parametrize("holder", ["another program", "a running lmserve"])
def test_a_taken_port_is_one_line_before_the_model_loads(tiny_model_dir: Path, holder: str) -> None:
    port = free_port()
    hold = listener(port) if holder == "another program" else running_lmserve(tiny_model_dir, port)
    with hold:
        proc = serve(tiny_model_dir, "--port", str(port))
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)  # no "loaded ..." line: it failed before loading
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in line


def test_a_taken_metrics_port_is_one_line_before_the_model_loads(tiny_model_dir: Path) -> None:
    port = free_port()
    with listener(port):
        proc = serve(tiny_model_dir, "--port", "0", "--metrics-port", str(port))
    assert proc.returncode != 0
    assert f"--metrics-port {port}: 127.0.0.1:{port} is already in use" in one_error_line(
        proc.stderr
    )


def test_a_daemon_does_not_share_its_port(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """gRPC's default SO_REUSEPORT would let a second server bind the port and take half of
    the new connections; it must fail instead (the check before loading aside)."""
    first: RunningDaemon = make_daemon()
    with pytest.raises(OSError, match=f"--port {first.port}: cannot listen on 127.0.0.1"):
        make_daemon(port=first.port)
