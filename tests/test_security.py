"""TLS, mutual TLS and bearer-token auth against real daemons, with certificates made here."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lmserve
from lmserve import AsyncClient, Client
from lmserve.cli import main as client_main
from lmserve.v1 import lmserve_pb2
from lmserve_server.cli import build_parser, config_from_args
from lmserve_server.config import ServerConfig
from lmserve_server.security import server_credentials
from tests.ops_support import Pki, make_pki

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_daemon(make_daemon, pki: Pki, **changes: object):  # type: ignore[no-untyped-def]
    return make_daemon(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), **changes)


def test_tls_serves_verified_clients_and_refuses_plaintext(make_daemon, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    running = tls_daemon(make_daemon, pki)
    port = running.port
    with Client(running.address, tls_ca=pki.ca) as client:
        assert client.tokenize("Hello World") == [15496, 2159]
    with Client(f"localhost:{port}", tls_ca=pki.ca.read_bytes()) as client:  # PEM bytes
        assert client.generate("Hi", max_new_tokens=2).completion_tokens == 2
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())  # credentials= still works
    with Client(running.address, credentials=credentials) as client:
        assert client.tokenize("Hello") == [15496]

    with pytest.raises(lmserve.UnavailableError), Client(running.address, timeout=5) as client:
        client.tokenize("plaintext to a TLS port")
    with (
        pytest.raises(lmserve.UnavailableError),
        Client(running.address, timeout=5, tls_ca=pki.other_ca) as client,
    ):
        client.tokenize("a server its CA did not sign")


async def test_async_client_speaks_tls_with_a_token(make_daemon, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    running = tls_daemon(make_daemon, pki, auth_token=TOKEN)
    async with AsyncClient(running.address, tls_ca=str(pki.ca), token=TOKEN) as client:
        assert await client.tokenize("Hello World") == [15496, 2159]
    async with AsyncClient(running.address, tls_ca=str(pki.ca)) as client:
        with pytest.raises(lmserve.UnauthenticatedError):
            await client.tokenize("no token")


def test_mutual_tls_requires_a_client_certificate_from_the_ca(make_daemon, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    running = tls_daemon(make_daemon, pki, tls_client_ca=str(pki.ca))
    with Client(
        running.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    ) as client:
        assert client.tokenize("Hello World") == [15496, 2159]
    with (
        pytest.raises(lmserve.UnavailableError),
        Client(running.address, timeout=5, tls_ca=pki.ca) as client,
    ):
        client.tokenize("no client certificate")
    with (
        pytest.raises(lmserve.UnavailableError),
        Client(
            running.address,
            timeout=5,
            tls_ca=pki.ca,
            tls_cert=pki.other_client_cert,
            tls_key=pki.other_client_key,
        ) as client,
    ):
        client.tokenize("a certificate from another CA")


def test_bearer_token_guards_the_service_but_not_health_or_reflection(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon(auth_token=TOKEN)
    with Client(running.address, token=TOKEN) as client:
        assert client.generate("Hi", max_new_tokens=2).completion_tokens == 2
        assert [c.finish_reason for c in client.stream("Hi", max_new_tokens=2)][-1] is not None

    refusals = {
        "missing credentials: send metadata 'authorization: Bearer <token>'": {},
        "invalid bearer token": {"token": "wrong"},
        "malformed authorization metadata: expected 'Bearer <token>'": {
            "metadata": [("authorization", f"Basic {TOKEN}")]
        },
    }
    for message, kwargs in refusals.items():
        with Client(running.address, **kwargs) as client:  # type: ignore[arg-type]
            with pytest.raises(lmserve.UnauthenticatedError) as err:
                client.generate("Hi", max_new_tokens=2)
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details == message
            with pytest.raises(lmserve.UnauthenticatedError):
                list(client.stream("Hi", max_new_tokens=2))
            with pytest.raises(lmserve.UnauthenticatedError):
                client.model_info()

    with grpc.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="lmserve.v1.Generator"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        listed = next(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        assert "lmserve.v1.Generator" in {s.name for s in listed.list_services_response.service}


def test_the_token_is_checked_before_the_request_is_read(
    make_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Parsing a request before checking its token would let anyone make the daemon
    receive and parse up to --max-message-bytes per call. The request's deserializer must
    run for authorised calls only; a refused one (4 MB, unary and streaming) is never
    parsed."""
    parsed: list[int] = []
    parse = lmserve_pb2.GenerateRequest.FromString

    def counting(data: bytes) -> lmserve_pb2.GenerateRequest:
        parsed.append(len(data))
        return parse(data)

    # The servicer's handlers take the deserializer when they are registered, at start.
    monkeypatch.setattr(lmserve_pb2.GenerateRequest, "FromString", counting)
    running = make_daemon(auth_token=TOKEN)
    big = "x" * (4 * 1024 * 1024 - 1024)
    with Client(running.address, timeout=30) as client:
        for call in (client.generate, lambda p: list(client.stream(p))):
            with pytest.raises(lmserve.UnauthenticatedError):
                call(big)
    assert parsed == []
    with Client(running.address, token=TOKEN, timeout=30) as client:
        assert client.generate("Hi", max_new_tokens=1).completion_tokens == 1
    assert len(parsed) == 1


def test_client_cli_takes_tls_and_token_flags_and_env(
    make_daemon,  # type: ignore[no-untyped-def]
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = tls_daemon(make_daemon, pki, tls_client_ca=str(pki.ca), auth_token=TOKEN)
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)]
    tls += ["--tls-key", str(pki.client_key)]
    argv = ["tokenize", "Hello World", "--target", running.address, *tls]
    assert client_main([*argv, "--token", TOKEN]) == 0
    assert capsys.readouterr().out.strip() == "15496 2159"

    assert client_main(argv) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err

    monkeypatch.setenv("LMSERVE_TOKEN", TOKEN)
    monkeypatch.setenv("LMSERVE_CLIENT_TLS_CA", str(pki.ca))
    monkeypatch.setenv("LMSERVE_CLIENT_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("LMSERVE_CLIENT_TLS_KEY", str(pki.client_key))
    assert client_main(["tokenize", "Hello", "--target", running.address]) == 0
    assert capsys.readouterr().out.strip() == "15496"


def test_serve_flags_and_env_fill_the_security_settings(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parse(*argv: str) -> ServerConfig:
        return config_from_args(build_parser().parse_args(["serve", *argv]))

    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    token_file.chmod(0o600)
    config = parse(
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca), "--auth-token-file", str(token_file),
        "--metrics-port", "9100", "--log-format", "json",
    )  # fmt: skip
    assert (config.tls_cert, config.tls_key) == (str(pki.server_cert), str(pki.server_key))
    assert (config.tls_client_ca, config.auth_token) == (str(pki.ca), TOKEN)
    assert (config.metrics_port, config.log_format) == (9100, "json")
    assert TOKEN not in repr(config)
    defaults = parse()
    assert (defaults.host, defaults.metrics_port, defaults.log_format) == ("127.0.0.1", 0, "text")
    assert (defaults.tls_cert, defaults.auth_token) == (None, None)

    monkeypatch.setenv("LMSERVE_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("LMSERVE_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("LMSERVE_TLS_KEY", str(pki.server_key))
    assert parse().auth_token == "from-env"
    assert parse().tls_cert == str(pki.server_cert)
    assert parse("--auth-token-file", str(token_file)).auth_token == TOKEN  # the file wins

    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        parse("--auth-token-file", str(token_file))
    monkeypatch.delenv("LMSERVE_TLS_KEY")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        parse()
    with pytest.raises(ValueError, match="--tls-client-ca"):
        ServerConfig(tls_client_ca=str(pki.ca))
    with pytest.raises(ValueError, match="not a PEM file"):
        server_credentials(str(token_file), str(pki.server_key), None)
    with pytest.raises(OSError, match="cannot read"):
        server_credentials(str(tmp_path / "missing.crt"), str(pki.server_key), None)


def plaintext_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "plaintext" in r.getMessage()
    ]


def test_plaintext_on_a_network_address_without_a_token_is_warned_about(
    make_daemon,  # type: ignore[no-untyped-def]
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lmserve_server")
    make_daemon()  # loopback: nobody else can reach it
    tls_daemon(make_daemon, pki, host="0.0.0.0")
    assert plaintext_warnings(caplog) == []
    running = make_daemon(host="0.0.0.0")
    assert plaintext_warnings(caplog) == [
        f"serving plaintext without a token on 0.0.0.0:{running.port}: anyone who can reach "
        "it can call it; set --tls-cert/--tls-key and --auth-token-file, or keep the port "
        "behind a firewall or network policy"
    ]
