"""The container image (Dockerfile, .dockerignore), as far as it can be checked without a
container runtime, which these machines lack: Docker's own parser (the ``dockerfile``
package wraps buildkit's) reads the file, every path it copies exists and is in the build
context, the image and deploy/kubernetes agree on user, ports, command and cache, and its
HEALTHCHECK command is run for real against a daemon and a dead port.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import lmserve
from lmserve_server.cli import build_parser
from tests.conftest import RunningDaemon
from tests.ops_support import free_port

dockerfile = pytest.importorskip("dockerfile")

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
Command = Any  # dockerfile.Command: cmd, flags, json, value


def stages() -> list[list[Command]]:
    """The Dockerfile's instructions per stage; stage 0 is what comes before the first FROM."""
    result: list[list[Command]] = [[]]
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            result.append([])
        result[-1].append(command)
    return result


def only(stage: list[Command], cmd: str) -> Command:
    (found,) = [c for c in stage if c.cmd == cmd]
    return found


def env(stage: list[Command]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            pairs.update(zip(command.value[::2], command.value[1::2], strict=True))
    return pairs


def container() -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment's pod spec and its one container."""
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    return pod, main


# ---- the build --------------------------------------------------------------------------


def test_the_base_image_is_a_build_argument_with_a_cuda_default() -> None:
    preamble, *built = stages()
    (base,) = [c.value[0] for c in preamble if c.cmd == "ARG" and c.value[0].startswith("BASE_")]
    name, _, default = base.partition("=")
    assert name == "BASE_IMAGE" and default.startswith("nvidia/cuda:"), base
    assert [stage[0].value[0] for stage in built] == ["${BASE_IMAGE}"] * len(built)
    assert len(built) == 2, "a build stage and a runtime stage without compilers and pip caches"


def test_torch_is_installed_first_at_the_version_the_server_extra_pins() -> None:
    build = stages()[1]
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    (torch_install,) = [r for r in runs if "torch==" in r]
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    assert f"torch=={pinned.group(1)}" in torch_install.split()
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_install
    assert any(c.cmd == "ARG" and c.value[0].startswith("TORCH_INDEX_URL=") for c in build)
    package_install = runs.index("pip install -c requirements.lock '.[server]'")
    assert runs.index(torch_install) < package_install


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is an exception, regex), with Docker's rules: ``*`` and ``?`` stop
    at ``/``, ``**`` crosses directories, a leading ``/`` is dropped."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def in_build_context(relative: str) -> bool:
    """Whether Docker sends ``relative`` (a path under the repository) to the build: the last
    pattern matching it or one of its parent directories decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exception, pattern in _ignore_patterns():
        if any(pattern.match(path) for path in candidates):
            included = exception
    return included


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    _, build, runtime = stages()
    stage_names = {build[0].value[2]} if len(build[0].value) == 3 else set()
    copied: list[str] = []
    for command in build + runtime:
        if command.cmd != "COPY":
            continue
        source_stage = [f.split("=", 1)[1] for f in command.flags if f.startswith("--from=")]
        if source_stage:
            assert source_stage[0] in stage_names, command.original
            continue
        for source in command.value[:-1]:
            path = ROOT / source
            assert path.exists(), f"{command.original}: {source} does not exist"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if "__pycache__" in relative:
                    continue
                assert in_build_context(relative), f"{relative} is excluded by .dockerignore"
            copied.append(source.rstrip("/"))
    # What pyproject.toml builds the package from (its readme and both package directories)
    # and the lock its dependencies are installed at.
    assert set(copied) == {"pyproject.toml", "README.md", "requirements.lock", "client", "server"}
    for large in (".venv/bin/python", "models/tiny-gpt2/config.json", ".git/HEAD", "tests"):
        assert not in_build_context(large), large
    assert not in_build_context("client/lmserve/__pycache__/cli.cpython-311.pyc")


# ---- the image and the Deployment ---------------------------------------------------------


def test_it_runs_as_the_non_root_user_the_deployment_names() -> None:
    runtime = stages()[-1]
    user, _, group = only(runtime, "USER").value[0].partition(":")
    assert user.isdigit() and group.isdigit(), "numeric, so Kubernetes can check runAsNonRoot"
    assert int(user) != 0 and int(group) != 0
    made = " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    assert f"useradd --uid {user} --gid {group}" in made and f"groupadd --gid {group}" in made
    pod, main = container()
    security = main["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(user), int(group))
    assert pod["securityContext"]["fsGroup"] == int(group)
    job = yaml.safe_load((KUBERNETES / "fill-hf-cache-job.yaml").read_text())
    job_security = job["spec"]["template"]["spec"]["securityContext"]
    assert (job_security["runAsUser"], job_security["runAsGroup"]) == (int(user), int(group))


def test_the_deployment_runs_the_image_s_command_on_the_image_s_ports() -> None:
    runtime = stages()[-1]
    entrypoint, cmd = only(runtime, "ENTRYPOINT"), only(runtime, "CMD")
    assert entrypoint.json and cmd.json, "exec form: the daemon is PID 1 and gets SIGTERM"
    assert list(entrypoint.value) == ["lmserve"]
    _, main = container()
    assert "command" not in main, "the Deployment keeps the image's ENTRYPOINT"
    assert main["args"] == list(cmd.value)
    assert build_parser().parse_args(main["args"]).command == "serve"
    assert main["image"] == f"lmserve:{lmserve.__version__}"

    image_env = env(runtime)
    pod_env = {e["name"]: e["value"] for e in main["env"]}
    exposed = {int(port) for port in only(runtime, "EXPOSE").value}
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert exposed == set(ports.values())
    assert int(image_env["LMSERVE_PORT"]) == int(pod_env["LMSERVE_PORT"]) == ports["grpc"]
    assert int(pod_env["LMSERVE_METRICS_PORT"]) == ports["metrics"]
    assert image_env["LMSERVE_HOST"] == pod_env["LMSERVE_HOST"] == "0.0.0.0"
    assert image_env["HF_HOME"] == pod_env["HF_HOME"]
    assert only(runtime, "VOLUME").value == (image_env["HF_HOME"],)
    # `lmserve` is found on PATH: the venv the build stage made and the runtime copied.
    venv_bin = image_env["PATH"].split(":")[0]
    assert any(c.cmd == "COPY" and c.value[0] == str(Path(venv_bin).parent) for c in runtime), (
        venv_bin
    )


def test_the_healthcheck_waits_as_long_as_the_startup_probe() -> None:
    healthcheck = only(stages()[-1], "HEALTHCHECK")
    flags = dict(f.lstrip("-").split("=", 1) for f in healthcheck.flags)
    _, main = container()
    probe = main["startupProbe"]
    assert (
        int(flags["start-period"].rstrip("s")) >= probe["periodSeconds"] * probe["failureThreshold"]
    )


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's command as Docker runs it (``/bin/sh -c``), with the image's
    LMSERVE_PORT set to ``port`` and this environment's lmserve-client on PATH."""
    healthcheck = only(stages()[-1], "HEALTHCHECK")
    kind, shell_command = healthcheck.value
    assert kind == "CMD"
    bin_dir = str(Path(sys.executable).parent)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    environment["LMSERVE_PORT"] = str(port)
    return subprocess.run(
        ["/bin/sh", "-c", shell_command],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_healthcheck_says_healthy_for_a_serving_daemon_and_1_otherwise(
    daemon: RunningDaemon,
) -> None:
    healthy = run_healthcheck(daemon.port)
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout == "SERVING\n"
    dead = run_healthcheck(free_port())
    assert dead.returncode == 1, "Docker reads 1 as unhealthy (2 is reserved)"
    assert "UNAVAILABLE" in dead.stderr
