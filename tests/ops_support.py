"""Helpers for the operations tests: free ports, a throwaway PKI, /metrics scraping and
starting a real ``lmserve serve`` process."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

LMSERVE = [sys.executable, "-m", "lmserve_server.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed server and client
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """Writes a CA, a server certificate, a client certificate and an unrelated CA's client."""
    directory.mkdir(parents=True, exist_ok=True)
    made: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
    for name, subject, issuer, server in (
        ("ca", "lmserve test CA", None, False),
        ("server", "localhost", "ca", True),
        ("client", "lmserve test client", "ca", False),
        ("other-ca", "some other CA", None, False),
        ("other-client", "stranger", "other-ca", False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(subject, key, made[issuer] if issuer else None, server=server)
        made[name] = (cert, key)
        _write(directory / name, cert, key)
    d = directory
    return Pki(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        other_ca=d / "other-ca.crt",
        other_client_cert=d / "other-client.crt",
        other_client_key=d / "other-client.key",
    )


# ---- /metrics --------------------------------------------------------------------------------


def scrape(
    port: int, host: str = "127.0.0.1"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# ---- a real process --------------------------------------------------------------------------

# Every lmserve process a test started (ServeProcess, tracked Popen): conftest's autouse
# fixture kills those still running when their test ends, passed, failed or timed out.
STARTED: list[subprocess.Popen[str]] = []


def track(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    STARTED.append(proc)
    return proc


def kill_leftovers() -> list[int]:
    """Kills (and reaps) every tracked process still running; returns their pids."""
    killed = []
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            killed.append(proc.pid)
    STARTED.clear()
    return killed


def run_group(
    command: list[str], *, timeout: float, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True)`` in a process group of its
    own, the whole group killed when the command ends, times out or the test is stopped
    (pytest-timeout included): a script that starts daemons (benchmarks/gpu.py, the README's
    paste) leaves none behind, even ones whose parent was killed. On timeout it fails the
    test with the output's tail, before pytest's own timeout would (keep ``timeout`` below
    it). The output goes through files, not pipes: a leftover process holding a pipe open
    would keep a reader waiting after the command itself has ended."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )
        try:
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait(timeout=30)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        raise AssertionError(
            f"{' '.join(command)} did not finish in {timeout:g} s:\n{stdout[-3000:]}\n"
            f"{stderr[-3000:]}"
        )
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing left behind
        os.killpg(pgid, signal.SIGKILL)


class ServeProcess:
    """``lmserve serve`` in a subprocess; its stderr lines are collected in ``lines``."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = track(
            subprocess.Popen(
                [*LMSERVE, "serve", "--model", str(model), *args],
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        )
        self.lines: list[str] = []
        self._serving = threading.Event()
        self.address = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"serving .* on (\S+:\d+)", line)
            if match and not self._serving.is_set():
                self.address = match.group(1)
                self._serving.set()

    def wait_serving(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not self._serving.wait(0.1):
            code = self.proc.poll()
            assert code is None, f"exited with {code}:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, "did not report serving:\n" + "\n".join(self.lines)
        return self.address

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
