"""How ``lmserve serve`` fails to start: one ``lmserve: error:`` line naming what is wrong,
a non-zero exit, and no model loaded in vain. Real processes, real sockets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lmserve import Client
from tests.conftest import RunningDaemon
from tests.ops_support import LMSERVE, ServeProcess, free_port, make_pki


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


def test_the_metrics_port_equal_to_the_port_is_one_line_before_the_model_loads(
    tiny_model_dir: Path,
) -> None:
    port = free_port()
    proc = serve(tiny_model_dir, "--port", str(port), "--metrics-port", str(port))
    assert proc.returncode != 0
    assert f"--metrics-port {port} is also --port" in one_error_line(proc.stderr)


def test_a_host_that_does_not_resolve_is_one_line_even_on_port_0(tiny_model_dir: Path) -> None:
    proc = serve(tiny_model_dir, "--port", "0", "--host", "no-such-host.invalid")
    assert proc.returncode != 0
    assert "--host no-such-host.invalid: cannot resolve it" in one_error_line(proc.stderr)


def test_an_address_of_another_machine_is_one_line_before_the_model_loads(
    tiny_model_dir: Path,
) -> None:
    proc = serve(tiny_model_dir, "--port", "0", "--host", "192.0.2.1")  # TEST-NET-1
    assert proc.returncode != 0
    assert "--host 192.0.2.1 --port 0: cannot listen on 192.0.2.1:0: it is not an address of " in (
        one_error_line(proc.stderr)
    )


def test_host_double_colon_serves_every_address(tiny_model_dir: Path) -> None:
    """``--host ::`` (gRPC needs ``[::]:port``) listens on IPv6 and, dual-stack, IPv4."""
    port = free_port()
    server = ServeProcess(tiny_model_dir, "--host", "::", "--port", str(port))
    try:
        assert server.wait_serving() == f"[::]:{port}"
        targets = [f"127.0.0.1:{port}"]
        if socket.has_ipv6:
            targets.append(f"ipv6:[::1]:{port}")
        for target in targets:
            with Client(target, timeout=30) as client:
                assert client.tokenize("Hello World") == [15496, 2159], target
    finally:
        server.kill()
    assert any("serving plaintext without a token on [::]:" in line for line in server.lines)


def test_a_tls_key_that_is_not_the_certificates_is_one_line_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    cases = {
        (pki.server_cert, pki.client_key): "is not the private key of --tls-cert",
        (pki.server_cert, pki.server_cert): "no private key in it",
        (pki.server_key, pki.server_key): "no certificate in it",
    }
    for (cert, key), said in cases.items():
        proc = serve(tiny_model_dir, "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
        assert proc.returncode != 0
        assert said in one_error_line(proc.stderr), (cert, key)
    proc = serve(
        tiny_model_dir,
        *("--port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--tls-client-ca", str(pki.server_key)),
    )
    assert proc.returncode != 0
    assert "--tls-client-ca" in one_error_line(proc.stderr)


def test_a_daemon_does_not_share_its_port(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """gRPC's default SO_REUSEPORT would let a second server bind the port and take half of
    the new connections; it must fail instead (the check before loading aside)."""
    first: RunningDaemon = make_daemon()
    with pytest.raises(OSError, match=f"--port {first.port}: cannot listen on 127.0.0.1"):
        make_daemon(port=first.port)


def broken_copy(model: Path, into: Path, how: str) -> Path:
    """A copy of ``model`` whose weights file is cut in half, or has a garbage header."""
    shutil.copytree(model, into)
    weights = into / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\xff" * 8 + data[8:])
    return into


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_a_broken_weights_file_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, how: str, log_format: str
) -> None:
    model = broken_copy(tiny_model_dir, tmp_path / "broken", how)
    proc = serve(model, "--port", "0", "--log-format", log_format)
    assert proc.returncode != 0
    line = error_line(proc.stderr, log_format)
    assert f"could not load the model from the directory {str(model)!r}: SafetensorError" in line
    assert "truncated or corrupt" in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_missing_model_directory_is_said_to_be_missing(tmp_path: Path, log_format: str) -> None:
    proc = subprocess.run(
        [*LMSERVE, "serve", "--model", "./no-such-dir", "--port", "0", "--log-format", log_format],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        # Offline, a Hub look-up (the wrong answer here) fails fast instead of timing out.
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    line = error_line(proc.stderr, log_format)
    assert f"no such directory: {tmp_path / 'no-such-dir'} does not exist" in line
    assert "Hugging Face" not in line


def test_a_relative_path_under_a_local_directory_is_no_such_directory(tmp_path: Path) -> None:
    """``models/tiny-gpt3`` looks like a Hub ``owner/name``; with a ``models`` directory
    here it is a path, and a missing one (not a Hub look-up that fails offline)."""
    (tmp_path / "models" / "tiny-gpt2").mkdir(parents=True)
    proc = subprocess.run(
        [*LMSERVE, "serve", "--model", "models/tiny-gpt3", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert f"no such directory: {tmp_path / 'models' / 'tiny-gpt3'} does not exist" in line
    assert "(did you mean 'models/tiny-gpt2'?)" in line
    assert "Hugging Face" not in line


def test_a_directory_without_a_model_says_what_it_lacks(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(serve(empty, "--port", "0").stderr)
    assert f"the directory {empty} holds no model: it has no config.json, no weights" in line
    assert "no tokenizer files" in line
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)
    line = one_error_line(serve(config_only, "--port", "0").stderr)
    assert "it has no weights (model.safetensors" in line and "no tokenizer files" in line


def test_lmserve_version() -> None:
    from importlib.metadata import version

    proc = subprocess.run([*LMSERVE, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"lmserve {version('lmserve')}"


def test_a_non_sdpa_model_under_the_continuous_scheduler_is_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "eager"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    # The public key (transformers 5.25 ignores the private ``_attn_implementation`` in a
    # config file; every 5.x reads this one).
    config["attn_implementation"] = "eager"
    (model / "config.json").write_text(json.dumps(config))
    proc = serve(model, "--port", "0", "--scheduler", "continuous", "--log-format", "json")
    assert proc.returncode != 0
    assert (
        "--scheduler continuous needs a model with SDPA attention; this one uses 'eager'"
        in error_line(proc.stderr, "json")
    )


def error_line(stderr: str, log_format: str) -> str:
    """The failure's one line; in JSON mode every line is an object and the last says it."""
    if log_format == "text":
        return one_error_line(stderr)
    records = [json.loads(line) for line in stderr.splitlines()]
    assert records[-1]["level"] == "ERROR"
    assert all(not r["message"].startswith("lmserve: error: ") for r in records[:-1])
    message = str(records[-1]["message"])
    assert message.startswith("lmserve: error: ")
    return message
