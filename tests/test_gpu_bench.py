"""``benchmarks/gpu.py`` (the whole GPU check, one command) as a CPU smoke test: with
``--quick`` it runs every leg but the peer on the tiny checkpoint, so the script can't rot
between the rare sessions that have a GPU. Its figures here mean nothing; its checks do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.ops_support import run_group

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_the_gpu_check_runs_every_leg_on_the_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    legs = ["smoke", "continuous", "compiled", "steps", "generate", "eager"]
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--model", str(tiny_model_dir),
        "--device", "cpu", "--quick", "--out-dir", str(tmp_path),
        *(arg for leg in legs for arg in ("--leg", leg)),
    ]  # fmt: skip
    # Its daemons die with it (run_group), and its limit fires before pytest's (the mark).
    done = run_group(command, timeout=480, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("gpu-*.json")}
    assert set(files) == {f"gpu-{leg}.json" for leg in legs} | {"gpu-targets.json"}
    for leg in legs:
        run = files[f"gpu-{leg}.json"]["run"]
        assert run["device"].startswith("cpu") and "leg_seconds" in run
    smoke = files["gpu-smoke.json"]["smoke"]
    assert smoke["load_s"] > 0 and smoke["first_request_s"] > 0
    assert smoke["graph_replays"] > 0, "the captured decode step was replayed"
    assert smoke["greedy_alone_equals_together"] == "4/4"
    assert {"batch 1", "batch 4"} <= set(files["gpu-eager.json"]["generate, eager"])
    for leg, mode in (
        ("steps", "lmserve static steps"),
        ("generate", "lmserve static generate"),
        ("continuous", "lmserve continuous"),
    ):
        figures = files[f"gpu-{leg}.json"][mode]
        for load in ("uniform, cold", "single", "uniform", "mixed", "sampled", "shared"):
            assert figures[load]["tokens_per_s"] > 0 and figures[load]["p99_ms"] > 0, (mode, load)
        assert figures["cold / steady"] > 0
        checks = figures["correctness"]
        assert checks["greedy_batch_invariant"] == "16/16", (mode, checks)
        assert checks["stream_equals_unary"] == "16/16", (mode, checks)
        assert checks["seeded_sample_repeats"] is True
        assert checks["max_batch_size_seen"] > 1, "the 16 requests were batched"
    targets = files["gpu-targets.json"]["targets"]
    assert "lmserve continuous: uniform / ceiling" in targets
    assert targets["ceiling"] == "eager (no static cache)"  # compiled only on a GPU
