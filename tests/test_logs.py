"""Logs: a line per batch at info, a line per call at debug with its request id (which goes
back to the caller in trailing metadata), and the JSON format."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import grpc
import pytest

import lmserve
from lmserve import Client
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.logs import JsonFormatter
from tests.conftest import RunningDaemon
from tests.ops_support import ServeProcess, make_pki


def _trailing_id(call: grpc.Call) -> str:
    return dict(call.trailing_metadata() or ())["x-request-id"]


def test_request_id_round_trips_and_each_call_and_batch_is_logged(
    daemon: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lmserve_server")
    request = lmserve_pb2.GenerateRequest(prompt="Hello", max_new_tokens=3)
    with grpc.insecure_channel(daemon.address) as channel:
        stub = lmserve_pb2_grpc.GeneratorStub(channel)
        reply, call = stub.Generate.with_call(
            request, metadata=[("x-request-id", "req-42")], timeout=30
        )
        assert _trailing_id(call) == "req-42"
        _, call = stub.Generate.with_call(request, timeout=30)
        made_up = _trailing_id(call)
        assert len(made_up) == 32 and made_up != "req-42"
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(lmserve_pb2.GenerateRequest(prompt=""), timeout=30)
        failed_id = _trailing_id(err.value)  # type: ignore[arg-type]

    # The server logs a call once it has ended, which may be just after the client has
    # its reply: give the daemon's loop a moment.
    deadline = time.monotonic() + 5
    while True:
        calls = {r.request_id: r for r in caplog.records if r.name == "lmserve_server.requests"}
        if {"req-42", made_up, failed_id} <= calls.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    ok = calls["req-42"]
    assert ok.levelno == logging.DEBUG
    assert (ok.method, ok.status) == ("Generate", "OK")
    assert ok.latency_ms > 0 and "req-42" in ok.getMessage()
    assert calls[made_up].status == "OK"
    assert (calls[failed_id].status, calls[failed_id].method) == ("INVALID_ARGUMENT", "Generate")

    batches = [r for r in caplog.records if hasattr(r, "batch_size")]
    assert len(batches) == 2, "the invalid request never reaches a batch"
    assert all(r.levelno == logging.INFO and r.name == "lmserve_server.app" for r in batches)
    assert all(r.batch_size == 1 and r.compute_ms > 0 and r.tokens == 3 for r in batches)
    assert reply.compute_ms == pytest.approx(batches[0].compute_ms, rel=0.5, abs=5)


def test_json_formatter_writes_one_object_per_line_with_the_extra_fields() -> None:
    record = logging.LogRecord(
        "lmserve_server.app", logging.INFO, __file__, 1, "batch of %d\nran", (3,), None
    )
    record.batch_size = 3
    record.compute_ms = 12.5
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "INFO" and out["logger"] == "lmserve_server.app"
    assert out["message"] == "batch of 3\nran"
    assert (out["batch_size"], out["compute_ms"]) == (3, 12.5)
    assert out["time"].endswith("+00:00")
    assert not {"args", "msg", "levelno", "pathname"} & set(out)

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in out["exception"]


def test_json_logs_turn_grpc_core_lines_into_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    """gRPC core writes its own lines to stderr (here: the failed TLS handshake of a
    plaintext client); under --log-format json they must be JSON objects like the rest."""
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = ServeProcess(tiny_model_dir, "--port", "0", "--log-format", "json", *tls)
    try:
        address = server.wait_serving()
        with Client(address, timeout=5) as client, pytest.raises(lmserve.UnavailableError):
            client.tokenize("plaintext to a TLS port")
        assert server.stop() == 0
    finally:
        server.kill()
    records = [json.loads(line) for line in server.lines]  # every line parses
    core = [r for r in records if r["logger"] == "grpc"]
    assert any("Handshake failed" in r["message"] for r in core), server.lines
    assert all(r["level"] in ("INFO", "WARNING", "ERROR") and r["source"] for r in core)
    assert records[-1]["message"] == "stopped"


def test_continuous_steps_are_json_lines_that_the_readme_jq_filter_selects(
    tiny_model_dir: Path,
) -> None:
    """README's ``jq 'select(.batch_size)'`` must select something under --scheduler
    continuous too. Each step is a debug line with the fields of a static batch line (info
    would flood the journal: a step every few milliseconds)."""
    flags = ["--scheduler", "continuous", "--log-format", "json"]
    for level, expect_steps in (("debug", True), ("info", False)):
        server = ServeProcess(tiny_model_dir, "--port", "0", *flags, "--log-level", level)
        try:
            with Client(server.wait_serving(), timeout=60) as client:
                completion = client.generate("Hello", max_new_tokens=5).completion_tokens
            assert server.stop() == 0
        finally:
            server.kill()
        records = [json.loads(line) for line in server.lines]
        steps = [r for r in records if r.get("batch_size")]  # jq 'select(.batch_size)'
        if not expect_steps:
            assert steps == [], steps
            continue
        assert steps and all(r["level"] == "DEBUG" and r["compute_ms"] > 0 for r in steps)
        assert sum(r["tokens"] for r in steps) == completion == 5
        assert all(r["message"].startswith("step of 1 row ran in ") for r in steps)
