"""Three real daemons on loopback behind one balanced client channel: the load lands on all
three, and when one drains (SIGTERM) and another dies (SIGKILL) mid-run, every request the
load tester sent still completes OK."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from lmserve import Client
from lmserve.balancing import resolve_target
from lmserve.cli import main as client_main
from tests.ops_support import ServeProcess, free_port, scrape

GENERATE_OK = ("lmserve_requests_total", (("code", "OK"), ("method", "Generate")))


def served(metrics_port: int) -> float:
    return scrape(metrics_port).get(GENERATE_OK, 0.0)


def test_resolve_target() -> None:
    assert resolve_target("dns:///lmserve.default.svc:50051") == "dns:///lmserve.default.svc:50051"
    assert resolve_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="dns:///"):
        resolve_target(["a.example:1", "b.example:2"])


@pytest.mark.timeout(600)
def test_balanced_load_survives_a_drain_and_a_crash(tiny_model_dir: Path, tmp_path: Path) -> None:
    metrics_ports = [free_port() for _ in range(3)]
    daemons = [
        ServeProcess(
            tiny_model_dir,
            "--port",
            "0",
            "--metrics-port",
            str(port),
            "--max-wait-ms",
            "5",
            "--drain-timeout",
            "30",
        )
        for port in metrics_ports
    ]
    try:
        addresses = [d.wait_serving() for d in daemons]
        target = resolve_target(addresses)
        report_path = tmp_path / "report.json"
        requests = 600
        exit_codes: list[int] = []
        bench = threading.Thread(
            target=lambda: exit_codes.append(
                client_main(
                    [
                        "bench",
                        "--target",
                        target,
                        "--timeout",
                        "60",
                        "--requests",
                        str(requests),
                        "--concurrency",
                        "12",
                        "--max-new-tokens",
                        "24",
                        "--warmup",
                        "0",
                        "--no-progress",
                        "--json",
                        str(report_path),
                    ]
                )
            )
        )
        bench.start()

        # The load lands on all three replicas.
        deadline = time.monotonic() + 60
        while not all(served(p) >= 5 for p in metrics_ports):
            assert bench.is_alive(), "the bench finished before every replica got load"
            assert time.monotonic() < deadline, [served(p) for p in metrics_ports]
            time.sleep(0.05)

        daemons[0].proc.send_signal(signal.SIGTERM)  # drains: in-flight calls finish
        time.sleep(0.5)
        daemons[1].proc.kill()  # dies: its in-flight calls are retried elsewhere
        assert bench.is_alive(), "both failures must happen mid-run"
        # Generous: one replica serves most of the 600 on a CPU that may be shared; what is
        # under test is that every request succeeds, not how fast.
        bench.join(timeout=480)
        assert not bench.is_alive()

        report = json.loads(report_path.read_text())
        assert exit_codes == [0], report.get("errors")
        assert report["requests"] == {"sent": requests, "ok": requests, "errors": 0}
        assert daemons[0].proc.wait(timeout=60) == 0
        # The survivor took the rest.
        assert served(metrics_ports[2]) > 0
        with Client(addresses[2]) as client:
            assert client.generate("still here", max_new_tokens=2).completion_tokens == 2
    finally:
        for d in daemons:
            d.kill()
