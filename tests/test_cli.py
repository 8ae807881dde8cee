"""The `lmserve` command as an operator runs it: a real process, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lmserve
from lmserve import Client
from tests.ops_support import ServeProcess, track

LMSERVE = [sys.executable, "-m", "lmserve_server.cli"]


def start_daemon(model: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = track(
        subprocess.Popen(
            [*LMSERVE, "serve", "--model", str(model), "--port", "0", *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        match = re.search(r"serving .* on (\S+:\d+)", line)
        if match:
            # Keep draining stderr so the daemon never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, match.group(1)
        assert time.monotonic() < deadline, "the daemon did not report serving in time"
    raise AssertionError(f"the daemon exited with {proc.wait()} before serving")


def test_sigterm_drains_under_load_and_exits_0(tiny_model_dir: Path) -> None:
    """NOT_SERVING at once, new calls UNAVAILABLE, every accepted request finished, exit 0."""
    proc, address = start_daemon(tiny_model_dir, "--max-wait-ms", "5", "--drain-timeout", "300")
    try:
        with Client(address) as client:
            client.wait_ready(timeout=10)
            assert client.tokenize("Hello World") == [15496, 2159]
        channel = grpc.insecure_channel(address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="lmserve.v1.Generator"), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    Client(address, timeout=300)
                    .generate("Hi", max_new_tokens=500)
                    .completion_tokens
                )
            )
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # let the requests be accepted
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(lmserve.UnavailableError):
            Client(address, balance=False).generate("too late", max_new_tokens=1)
        assert any(t.is_alive() for t in threads), "the drain must happen under load"
        deadline = time.monotonic() + 300  # the requests' own deadline
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert proc.wait(timeout=60) == 0
        assert results == [500] * 6
        channel.close()
    finally:
        proc.kill()


def test_missing_model_fails_fast_with_a_message(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [*LMSERVE, "serve", "--model", str(tmp_path / "no-such-model"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "could not load model" in proc.stderr
    assert "lmserve make-test-model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30


def test_env_vars_set_flags_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmserve_server.cli import build_parser, config_from_args

    monkeypatch.setenv("LMSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LMSERVE_MODEL", "/models/x")
    monkeypatch.setenv("LMSERVE_REFLECTION", "false")
    config = config_from_args(build_parser().parse_args(["serve", "--max-wait-ms", "3"]))
    assert (config.max_batch_size, config.max_wait_ms) == (7, 3.0)
    assert (config.engine.model, config.reflection) == ("/models/x", False)
    config = config_from_args(build_parser().parse_args(["serve", "--max-batch-size", "9"]))
    assert config.max_batch_size == 9
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert "LMSERVE_MAX_BATCH_SIZE; default: 7" in help_text


def serve_lines(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """``lmserve serve`` on a model directory that does not exist (it stops before torch is
    imported): its exit code and stderr lines."""
    proc = subprocess.run(
        [*LMSERVE, "serve", "--model", "./no-such-model", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")},
            **(env or {}),
        },
    )
    return proc.returncode, proc.stderr.splitlines()


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (
            [],
            {"LMSERVE_SCHEDULER": "continous"},
            "LMSERVE_SCHEDULER='continous': not one of the choices of --scheduler: static, "
            "continuous",
        ),
        (
            [],
            {"LMSERVE_MAX_QUEUE": "1o24"},
            "LMSERVE_MAX_QUEUE='1o24': --max-queue takes a whole number",
        ),
        (
            ["--max-step-tokens", "8", "--scheduler", "continuous"],
            {},
            "--max-step-tokens (LMSERVE_MAX_STEP_TOKENS) 8: must exceed --max-batch-size (32) "
            "with --scheduler continuous",
        ),
        (
            ["--max-queue", "0", "--default-max-new-tokens", "2000"],
            {},
            "--max-queue (LMSERVE_MAX_QUEUE) 0: must be at least 1; --default-max-new-tokens "
            "(LMSERVE_DEFAULT_MAX_NEW_TOKENS) 2000: must be from 1 to --max-new-tokens-cap (1024)",
        ),
    ],
)
def test_a_settings_error_names_the_setting_the_value_and_the_reason(
    args: list[str], env: dict[str, str], said: str
) -> None:
    """An operator fixes a setting from the one line alone: it names the flag and its
    variable, the value given, and what would do (a bare "invalid setting(s): scheduler"
    leaves them to guess which source set it, and to what)."""
    code, lines = serve_lines(*args, env=env)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"lmserve: error: {said}"), lines


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--scheduler", "continous"],
            "--scheduler (LMSERVE_SCHEDULER) 'continous': choose static or continuous",
        ),
        (
            ["--dtype", "bf16"],
            "--dtype (LMSERVE_DTYPE) 'bf16': choose auto, float16, bfloat16 or float32",
        ),
        (["--max-queue", "1o24"], "--max-queue (LMSERVE_MAX_QUEUE) '1o24': takes a whole number"),
        (["--warm-up", "maybe"], "--warm-up (LMSERVE_WARM_UP) 'maybe': expected true or false"),
        (["--max-qeue", "8"], "unrecognized arguments: --max-qeue 8"),
    ],
)
def test_a_mistyped_flag_value_is_one_line(args: list[str], said: str) -> None:
    """A mistake on the command line is one line like every other start-up failure (the
    Troubleshooting table's promise), not argparse's usage text before the error."""
    code, lines = serve_lines(*args)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"lmserve: error: {said} (see lmserve"), lines


def test_a_bad_variable_that_a_flag_overrides_does_not_matter() -> None:
    code, lines = serve_lines("--scheduler", "static", env={"LMSERVE_SCHEDULER": "continous"})
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines


def test_a_setting_the_scheduler_ignores_is_warned_about() -> None:
    code, lines = serve_lines(
        "--max-step-tokens", "8", "--static-engine", "generate", env={"LMSERVE_MAX_WAIT_MS": "3"}
    )
    assert code == 2 and "does not exist" in lines[-1]
    assert any(
        "--max-step-tokens 8 (LMSERVE_MAX_STEP_TOKENS) is ignored: it applies to --scheduler "
        "continuous, and this daemon runs static" in line
        for line in lines
    ), lines
    code, lines = serve_lines("--scheduler", "continuous", env={"LMSERVE_MAX_WAIT_MS": "3"})
    assert any("--max-wait-ms 3.0 (LMSERVE_MAX_WAIT_MS) is ignored" in line for line in lines)
    code, lines = serve_lines("--max-wait-ms", "3")  # static's own: nothing to say
    assert len(lines) == 1, lines
    # Static batches through the runner's steps read the runner's settings.
    code, lines = serve_lines("--max-step-tokens", "64", "--static-engine", "steps")
    assert len(lines) == 1, lines


@pytest.mark.parametrize("size", ["tiny"])
def test_make_test_model_writes_a_loadable_checkpoint(tmp_path: Path, size: str) -> None:
    out = subprocess.run(
        [*LMSERVE, "make-test-model", str(tmp_path / "m"), "--size", size],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lmserve serve --model" in out
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= names


@pytest.mark.parametrize(
    ("flags", "packed"),
    [([], True), (["--pack-weights", "false"], False), (["--pack-weights", "true"], True)],
)
def test_pack_weights_is_on_unless_turned_off(flags: list[str], packed: bool) -> None:
    from lmserve_server.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["serve", *flags]))
    assert config.engine.pack_weights is packed


# Run in a fresh interpreter: whether ``lmserve --help`` imported torch shows in sys.modules.
_HELP_IMPORTS = """
import sys
from lmserve_server.cli import main
for argv in (["--help"], ["serve", "--help"]):
    try:
        main(argv)
    except SystemExit as done:
        assert done.code == 0, done.code
print("heavy modules:", sorted({"torch", "transformers"} & set(sys.modules)))
"""


def test_help_imports_no_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_IMPORTS], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--max-batch-size" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "heavy modules: []"


# A client-only install (`pip install lmserve`): the server extra's modules are not there.
_WITHOUT_SERVER_EXTRA = """
import sys
from importlib.abc import MetaPathFinder


class NoServerExtra(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "transformers", "accelerate"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoServerExtra())
from lmserve_server.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv", [["serve", "--model", "gpt2", "--port", "0"], ["make-test-model", "somewhere"]]
)
def test_without_the_server_extra_the_command_says_what_to_install(
    argv: list[str], tmp_path: Path
) -> None:
    run = [sys.executable, "-c", _WITHOUT_SERVER_EXTRA]
    assert subprocess.run([*run, "--help"], capture_output=True, timeout=60).returncode == 0
    proc = subprocess.run([*run, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert proc.stderr.startswith("lmserve: error: ")
    assert "pip install 'lmserve[server]'" in proc.stderr


class LongStreams:
    """``count`` streams of 1000 tokens each (tens of seconds of engine time on this CPU),
    started together; ``wait_running()`` returns once one has its first chunk."""

    def __init__(self, address: str, count: int = 4) -> None:
        self.first_chunk = threading.Event()
        self.outcomes: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(address,)) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, address: str) -> None:
        try:
            with Client(address, timeout=300, balance=False) as client:
                for _ in client.stream("Once upon a time", max_new_tokens=1000):
                    self.first_chunk.set()
            self.outcomes.append("finished")
        except lmserve.LmserveError as err:
            self.outcomes.append(err.code.name)

    def wait_running(self) -> None:
        assert self.first_chunk.wait(timeout=60), "no stream started"

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads)


def test_the_drain_ends_at_its_timeout_even_with_the_engine_busy(tiny_model_dir: Path) -> None:
    """The running batch outlasts --drain-timeout by far: at the deadline its rows stop at
    their next step and their callers are told the server shut down; the process exits."""
    server = ServeProcess(tiny_model_dir, "--port", "0", "--drain-timeout", "1")
    try:
        streams = LongStreams(server.wait_serving())
        streams.wait_running()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=120)
        exit_s = time.monotonic() - signalled
        streams.join()
    finally:
        server.kill()
    print(f"exited {exit_s:.2f} s after SIGTERM with --drain-timeout 1")
    assert code == 0
    assert exit_s < 1 + 4, exit_s  # the timeout plus a margin, not the batch's remaining time
    # The batch was still running: it was cut, each caller with a clear status.
    assert streams.outcomes == ["UNAVAILABLE"] * 4
    assert any("drain timeout (1.0 s) reached" in line for line in server.lines)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_drain_exits_at_once(
    tiny_model_dir: Path, second: signal.Signals
) -> None:
    server = ServeProcess(tiny_model_dir, "--port", "0", "--drain-timeout", "300")
    try:
        streams = LongStreams(server.wait_serving())
        streams.wait_running()
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any("draining" in line for line in server.lines):
            assert time.monotonic() < deadline, server.lines
            time.sleep(0.01)
        signalled = time.monotonic()
        server.proc.send_signal(second)
        code = server.proc.wait(timeout=120)
        exit_s = time.monotonic() - signalled
        streams.join()
    finally:
        server.kill()
    print(f"exited {exit_s:.2f} s after the second signal ({second.name})")
    assert code == 128 + second
    assert exit_s < 4, exit_s  # at once, not when the 300 s drain or the batch ends
    assert any(f"{second.name} during the drain: exiting now" in line for line in server.lines)
