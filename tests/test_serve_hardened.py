"""A real ``lmserve serve`` process configured as in production: TLS with a bearer token
from a file, Prometheus /metrics and JSON logs, set through flags and LMSERVE_* variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmserve
from lmserve import Client
from tests.ops_support import ServeProcess, free_port, make_pki, scrape


def test_hardened_process_serves_tls_with_a_token_metrics_and_json_logs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    token_file = tmp_path / "token"
    token_file.write_text("hunter2-but-longer\n")
    token_file.chmod(0o600)
    metrics_port = free_port()
    env = {
        "LMSERVE_TLS_CERT": str(pki.server_cert),
        "LMSERVE_TLS_KEY": str(pki.server_key),
        "LMSERVE_METRICS_PORT": str(metrics_port),
        "LMSERVE_LOG_FORMAT": "json",
    }
    server = ServeProcess(
        tiny_model_dir,
        "--port", "0", "--auth-token-file", str(token_file), "--log-level", "debug",
        env=env,
    )  # fmt: skip
    try:
        address = server.wait_serving()
        with Client(address, tls_ca=pki.ca, token="hunter2-but-longer") as client:
            assert client.generate("Hello", max_new_tokens=4).completion_tokens == 4
        with Client(address, tls_ca=pki.ca) as client, pytest.raises(lmserve.UnauthenticatedError):
            client.tokenize("no token")
        samples = scrape(metrics_port)
        ok = ("lmserve_requests_total", (("code", "OK"), ("method", "Generate")))
        assert samples[ok] == 1
        assert samples[("lmserve_generated_tokens_total", ())] == 4
        assert server.stop() == 0
    finally:
        server.kill()

    records = [json.loads(line) for line in server.lines if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert any(m.startswith("serving ") and m.endswith("(TLS, bearer token)") for m in messages)
    assert any(m.startswith("metrics on http://127.0.0.1:") for m in messages)
    batches = [r for r in records if "batch_size" in r and r["level"] == "INFO"]
    assert [(b["batch_size"], b["tokens"]) for b in batches] == [(1, 4)]
    assert batches[0]["compute_ms"] > 0
    calls = [r for r in records if r["logger"] == "lmserve_server.requests"]
    assert [(c["method"], c["status"], c["level"]) for c in calls] == [
        ("Generate", "OK", "DEBUG"),
        ("Tokenize", "UNAUTHENTICATED", "DEBUG"),
    ]
    assert all(len(c["request_id"]) == 32 and c["latency_ms"] > 0 for c in calls)
    assert messages[-1] == "stopped"
