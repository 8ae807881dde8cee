"""The GPU check's wheel set (benchmarks/gpu_host_wheels.py) imports on the GPU host's image:
built here from the registry for Python 3.12, installed into a clean Python 3.12 beside the
host's recorded versions of what it does not carry, then imported. Skipped where no Python
3.12 or no registry is at hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_host_wheels  # noqa: E402

pytestmark = pytest.mark.slow

# The host's recorded packages a clean Python can take without torch (accelerate needs it).
WITHOUT_TORCH = {"torch", "triton", "accelerate", "transformers", "python"}


def python312() -> str | None:
    candidates = [str(Path.home() / ".pyenv/versions/3.12.1/bin/python3.12"), "python3.12"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
            return found
    return None


def registry_reachable() -> bool:
    probe = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", "/tmp/probe",
             "six==1.16.0"]  # fmt: skip
    return subprocess.run(probe, capture_output=True, timeout=120).returncode == 0


@pytest.fixture(scope="module")
def wheel_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not registry_reachable():
        pytest.skip("the package registry is not reachable")
    dest = tmp_path_factory.mktemp("whl")
    return dest, gpu_host_wheels.carry(dest)


def test_every_requirement_is_carried_or_on_the_host(wheel_set: tuple[Path, dict]) -> None:
    dest, carried = wheel_set
    host = gpu_host_wheels.read_host()
    assert "transformers" in carried and "llguidance" in carried
    assert "torch" not in carried
    for wheel in dest.glob("*.whl"):
        for req in gpu_host_wheels.wheel_requirements(wheel, set()):
            name = canonicalize_name(req.name)
            if name in gpu_host_wheels.HOST_ONLY:
                continue
            version = carried.get(name, host.get(name))
            where = f"{wheel.name} needs {req}"
            assert version is not None, f"{where}: neither carried nor on the host"
            assert req.specifier.contains(version, True), f"{where}, gets {version}"


def test_the_wheel_set_imports_in_a_clean_python_3_12(
    wheel_set: tuple[Path, dict], tmp_path: Path
) -> None:
    python = python312()
    if python is None:
        pytest.skip("no Python 3.12 here")
    dest, _ = wheel_set
    venv = tmp_path / "host"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    host = gpu_host_wheels.read_host()
    pins = [f"{n}=={v}" for n, v in host.items() if n not in WITHOUT_TORCH]
    subprocess.run([*pip, "--only-binary=:all:", *pins], check=True, timeout=300)
    site = tmp_path / "site"
    wheels = [str(w) for w in dest.glob("*.whl")]
    subprocess.run(
        [*pip, "--no-index", "--no-deps", "--target", str(site), *wheels], check=True, timeout=300
    )
    env = {"PYTHONPATH": f"{site}:{ROOT / 'server'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"}
    probe = (
        "import transformers, llguidance, grpc, grpc_health, grpc_reflection, lmserve, "
        "lmserve_server.cli, huggingface_hub as h; print(transformers.__version__, h.__version__)"
    )
    done = subprocess.run(
        [str(venv / "bin/python"), "-c", probe], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    transformers_version, hub_version = done.stdout.split()
    assert hub_version == str(host["huggingface-hub"])  # the host's own hub, not a carried one
    locked = {
        canonicalize_name(Requirement(line.split("#")[0]).name): line
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert f"transformers=={transformers_version}" == locked["transformers"]
