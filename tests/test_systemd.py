"""The systemd notify protocol, with a real NOTIFY_SOCKET around a real ``lmserve serve``."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmserve_server.config import ServerConfig
from lmserve_server.systemd import notify, watchdog_interval
from tests.ops_support import ServeProcess, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_status(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)
    except grpc.RpcError:
        return None


class NotifySocket:
    """A bound Unix datagram socket that records what arrives, as systemd would."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.on_ready: list[int | None] = []  # what health said the moment READY=1 came
        self.address = ""  # the daemon's, for that health check
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            if "READY=1" in data.splitlines():
                self.on_ready.append(health_status(self.address))
            self.messages.append((time.monotonic(), data))

    def states(self, name: str) -> list[float]:
        return [t for t, data in self.messages if name in data.splitlines()]

    def wait_for(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.states(name):
            assert time.monotonic() < deadline, f"no {name} in {self.messages}"
            time.sleep(0.01)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths must stay under ~100 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="lmserve-sd-") as directory:
        yield Path(directory)


def test_notify_does_nothing_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert notify("READY=1") is False
    assert watchdog_interval() is None


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lmserve-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=hi") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=hi"
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # someone else's watchdog
    assert watchdog_interval() is None


def test_serve_reports_ready_feeds_the_watchdog_and_reports_stopping(
    tiny_model_dir: Path, socket_dir: Path
) -> None:
    port = free_port()  # known up front, so the receiver can check health the moment READY=1 comes
    receiver = NotifySocket(str(socket_dir / "notify"))
    receiver.address = f"127.0.0.1:{port}"
    env = {"NOTIFY_SOCKET": str(socket_dir / "notify"), "WATCHDOG_USEC": "200000"}
    server = ServeProcess(tiny_model_dir, "--port", str(port), env=env)
    try:
        assert server.wait_serving() == receiver.address
        receiver.wait_for("READY=1", timeout=30)
        assert receiver.on_ready == [SERVING], "READY=1 came before health said SERVING"
        ready_at = receiver.states("READY=1")[0]
        ready_message = next(d for t, d in receiver.messages if t == ready_at)
        assert f"STATUS=serving {tiny_model_dir} on {receiver.address}" in ready_message

        time.sleep(1.0)  # pings every 0.1 s
        pings = [t for t in receiver.states("WATCHDOG=1") if t > ready_at]
        assert len(pings) >= 5, f"only {len(pings)} watchdog pings in a second"
        assert receiver.states("STOPPING=1") == []

        assert server.stop() == 0
        receiver.wait_for("STOPPING=1", timeout=5)
        assert receiver.states("STOPPING=1")[0] > ready_at
        assert len(receiver.states("READY=1")) == 1
    finally:
        server.kill()
        receiver.close()


# ---- the unit file and its env file ----------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "lmserve.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_file_is_a_hardened_notify_service() -> None:
    unit = unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/lmserve/.venv/bin/lmserve serve",
        "EnvironmentFile": "-/etc/lmserve/lmserve.env",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
        "StateDirectory": "lmserve",
        "CacheDirectory": "lmserve",
    }
    assert {key: unit.get(key, ["<missing>"])[-1] for key in expected} == expected
    assert "HF_HOME=%C/lmserve/huggingface" in unit["Environment"]
    assert int(unit["WatchdogSec"][-1]) > 0
    assert int(unit["TimeoutStopSec"][-1]) > ServerConfig().drain_timeout_s


@pytest.mark.parametrize("name", ["lmserve.service", "lmserve@.service"])
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this checkout's lmserve.
    lmserve = Path(sys.executable).with_name("lmserve")
    unit = (DEPLOY / name).read_text()
    # A template is verified as one of its instances.
    target = tmp_path / name.replace("@.", "@1.")
    target.write_text(unit.replace("/opt/lmserve/.venv/bin/lmserve", str(lmserve)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_per_gpu_template_keeps_the_service_s_settings() -> None:
    def directives(name: str) -> set[str]:
        lines = (DEPLOY / name).read_text().splitlines()
        return {line for line in lines if "=" in line and not line.startswith("#")}

    plain, template = directives("lmserve.service"), directives("lmserve@.service")
    assert plain - template == {
        "Description=lmserve gRPC language-model daemon",
        "DynamicUser=yes",
        "SyslogIdentifier=lmserve",
    }
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in template
    assert "EnvironmentFile=-/etc/lmserve/lmserve@%i.env" in template


def test_env_example_names_only_real_settings() -> None:
    from lmserve_server.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    known = {"LMSERVE_AUTH_TOKEN", "HF_HUB_OFFLINE"} | {
        "LMSERVE_" + flag[2:].replace("-", "_").upper()
        for action in serve._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }
    text = (DEPLOY / "lmserve.env.example").read_text()
    names = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert names and names <= known, names - known
    # Every setting, so an operator edits a line instead of looking up a variable's name.
    assert names == known, known - names
    assert "LMSERVE_SCHEDULER=continuous\n" in text  # README's recommendation
    metrics = text[text.index("# Prometheus") : text.index("#LMSERVE_METRICS_PORT")]
    assert "does not follow LMSERVE_HOST" in metrics and "127.0.0.1" in metrics


def test_the_template_s_header_installs_it_before_enabling_it() -> None:
    """The header's steps, run in order on a fresh host, must work: install the unit,
    daemon-reload and create /etc/lmserve before `enable --now` (which needs the unit) and
    `tee` (which needs the directory)."""
    header = [
        line.removeprefix("#").strip()
        for line in (DEPLOY / "lmserve@.service").read_text().splitlines()
        if line.startswith("#   sudo") or line.startswith("#   printf")
    ]
    steps = [
        "sudo systemd-sysusers /etc/sysusers.d/lmserve.conf",
        "sudo install -d /etc/lmserve",
        "printf 'LMSERVE_PORT=50051\\n' | sudo tee /etc/lmserve/lmserve@0.env",
        "sudo install -m 644 deploy/lmserve@.service /etc/systemd/system/lmserve@.service",
        "sudo systemctl daemon-reload",
        "sudo systemctl enable --now lmserve@0 lmserve@1",
    ]
    found = [next(i for i, line in enumerate(header) if line.startswith(s)) for s in steps]
    assert found == sorted(found), header


# ---- the per-GPU template's static user ------------------------------------------------------


def template_user() -> tuple[str, str]:
    settings = dict(
        line.split("=", 1)
        for line in (DEPLOY / "lmserve@.service").read_text().splitlines()
        if line.startswith(("User=", "Group="))
    )
    return settings["User"], settings["Group"]


def sysusers_entries() -> list[list[str]]:
    lines = (DEPLOY / "lmserve.sysusers").read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def test_the_template_s_user_is_declared_in_the_sysusers_file() -> None:
    user, group = template_user()
    assert user == group, "'u NAME' makes a group of the same name"
    # u: a system user and its group; -: any free system id; home: the StateDirectory.
    assert sysusers_entries() == [
        ["u", user, "-", "lmserve gRPC daemon", "/var/lib/lmserve", "/usr/sbin/nologin"]
    ]
    template = (DEPLOY / "lmserve@.service").read_text()
    assert "StateDirectory=lmserve" in template
    assert "useradd" not in template, "the user comes from the sysusers file, not by hand"
    assert "/etc/sysusers.d/lmserve.conf" in template


def test_systemd_sysusers_creates_the_template_s_user(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    # --root: into an empty directory tree, never this machine's /etc.
    proc = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(DEPLOY / "lmserve.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    user, group = template_user()

    def entries(name: str) -> dict[str, list[str]]:
        lines = (tmp_path / "etc" / name).read_text().splitlines()
        return {fields[0]: fields for fields in (line.split(":") for line in lines)}

    _, _, uid, gid, _, home, shell = entries("passwd")[user]
    assert 0 < int(uid) < 1000, "a system user"
    assert gid == entries("group")[group][2]
    assert (home, shell) == ("/var/lib/lmserve", "/usr/sbin/nologin")
