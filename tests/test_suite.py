"""The test suite itself on a loaded machine: every test's own limits fire before pytest's
last-resort timeout, and no process a test starts outlives it (a timed-out test must not
leave its daemon running, holding memory and cores, after the run)."""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomllib

from tests.ops_support import run_group

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _pytest_timeout() -> float:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return float(config["tool"]["pytest"]["ini_options"]["timeout"])


def _mark_timeout(function: ast.FunctionDef | ast.AsyncFunctionDef) -> float | None:
    for decorator in function.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and ast.unparse(decorator.func) == "pytest.mark.timeout"
            and decorator.args
        ):
            return float(ast.literal_eval(decorator.args[0]))
    return None


def test_every_limit_in_the_tests_is_inside_pytests_timeout() -> None:
    """A ``timeout=`` (a call's deadline, a wait, a subprocess) as long as pytest's own makes
    pytest-timeout the one that fires, with a stack dump instead of the test's message, and
    without the test's clean-up."""
    suite = _pytest_timeout()
    over = []
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            limit = _mark_timeout(function) or suite
            for node in ast.walk(function):
                if isinstance(node, ast.keyword) and node.arg == "timeout":
                    try:
                        value = float(ast.literal_eval(node.value))
                    except (ValueError, TypeError, SyntaxError):
                        continue  # computed: not a literal limit
                    if value >= limit:
                        over.append(f"{path.name}:{node.lineno} timeout={value:g} >= {limit:g}")
    assert not over, over


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _gone_soon(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_script_that_times_out_leaves_no_process_behind(tmp_path: Path) -> None:
    """``subprocess.run(timeout=)`` kills the script only: a daemon it started in the
    background (as benchmarks/gpu.py and the README's paste do) lived on."""
    pid_file = tmp_path / "pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with pytest.raises(AssertionError, match="did not finish in 2 s"):
        run_group(["bash", "-c", script], timeout=2)
    assert _gone_soon(int(pid_file.read_text()))
    run_group(["bash", "-c", script.replace("wait", "true")], timeout=30)  # ends at once
    assert _gone_soon(int(pid_file.read_text())), "a process left after the script ended"


INNER = """
import subprocess, sys, time
import pytest
from tests.ops_support import track

def start(name):
    proc = track(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]))
    open(name, "w").write(str(proc.pid))

def test_fails():
    start("failed.pid")
    assert False

@pytest.mark.timeout(3)
def test_times_out():
    start("timed-out.pid")
    time.sleep(60)
"""


def test_a_daemon_of_a_failed_or_timed_out_test_is_killed(tmp_path: Path) -> None:
    """Runs a pytest session with this suite's conftest: one test fails and one hits
    pytest's timeout, each having started a process; neither process may outlive it."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    done = run_group(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )  # fmt: skip
    assert "2 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Timeout" in done.stdout
    for name in ("failed.pid", "timed-out.pid"):
        assert _gone_soon(int((tmp_path / name).read_text())), name


def test_the_inner_session_would_leave_them_without_the_fixture(tmp_path: Path) -> None:
    """The same session without the suite's conftest: the processes outlive their tests, so
    the test above does check what the fixture does."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=120)
        pids = [int((tmp_path / n).read_text()) for n in ("failed.pid", "timed-out.pid")]
        assert all(_alive(pid) for pid in pids)
    finally:
        for name in ("failed.pid", "timed-out.pid"):
            if (tmp_path / name).exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int((tmp_path / name).read_text()), signal.SIGKILL)
