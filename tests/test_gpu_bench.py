"""``benchmarks/gpu.py`` (the whole GPU check, one command) as a CPU smoke test: with
``--quick`` it runs every leg on the tiny checkpoint, so the script can't rot between the
rare sessions that have a GPU. Its figures here mean nothing; its checks do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.ops_support import run_group

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_the_gpu_check_runs_every_leg_on_the_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--model", str(tiny_model_dir),
        "--device", "cpu", "--quick", "--out", str(out), "--skip", "peer",
    ]  # fmt: skip
    # Its daemons die with it (run_group), and its limit fires before pytest's (the mark).
    done = run_group(command, timeout=480, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["run"]["device"].startswith("cpu")
    assert {"batch 1", "batch 4"} <= set(figures["generate, eager"])
    for mode in ("lmserve static", "lmserve static generate", "lmserve continuous"):
        legs = figures[mode]
        for load in ("uniform, cold", "single", "uniform", "mixed", "sampled", "shared"):
            assert legs[load]["tokens_per_s"] > 0 and legs[load]["p99_ms"] > 0, (mode, load)
        assert legs["cold / steady"] > 0
        checks = legs["correctness"]
        assert checks["greedy_batch_invariant"] == "16/16", (mode, checks)
        assert checks["stream_equals_unary"] == "16/16", (mode, checks)
        assert checks["seeded_sample_repeats"] is True
        assert checks["max_batch_size_seen"] > 1, "the 16 requests were batched"
    targets = figures["targets"]
    assert "lmserve continuous: uniform / ceiling" in targets
    assert targets["ceiling"] == "eager (no static cache)"  # compiled only on a GPU
