"""A request's tokens do not depend on its company whichever kernels this CPU's libraries
pick: the families' invariance tests (greedy and seeded, every scheduler) again, in a fresh
interpreter with oneDNN held to an older instruction set (other matmul kernels: ``gemm:jit``
instead of ``brg_matmul``) and with one thread (no work split across threads). The packed
layers' warm-up check (``packing.invariant_min_rows``) is what makes them hold where a
kernel differs by row count; ``tests/test_packing.py`` shows it on such a kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "settings",
    [{"ONEDNN_MAX_CPU_ISA": "SSE41"}, {"OMP_NUM_THREADS": "1"}],
    ids=["onednn-sse41", "one-thread"],
)
def test_invariance_holds_with_other_cpu_kernels(settings: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "400",
         "tests/test_families.py", "-k", "do_not_depend_on_the_batch and gpt2-flat"],
        cwd=ROOT, env={**os.environ, **settings}, capture_output=True, text=True, timeout=450,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    assert "6 passed" in done.stdout
