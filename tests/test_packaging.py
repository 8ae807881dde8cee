"""Installing lmserve as the README's "Install" section says: it is on no package index, so
the wheel is built from the checkout (``python -m build --wheel``) and installed from its file.

The wheel is built from a copy of the sources, without build isolation so that no network is
needed. The client-only install goes into a throwaway virtual environment that holds the
wheel and its two dependencies (grpcio, protobuf, linked from this environment rather than
downloaded) and nothing else: there ``import lmserve`` and ``lmserve-client`` must work, and
torch must be absent. The ``[server]`` extra is checked against the wheel's metadata and
this environment, where ``make install`` put torch 2.13.0 from local disk.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.ops_support import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# What the wheel is built from (pyproject.toml's package-dir and readme).
SOURCES = ("pyproject.toml", "README.md", "client", "server")
CLIENT_DEPENDENCIES = ("grpcio", "protobuf")


def install_section() -> str:
    text = README.read_text()
    start = text.index("\n## Install\n")
    return text[start : text.index("\n## ", start + 1)]


def readme_wheel_name() -> str:
    """The wheel file the README's install commands name (one name throughout)."""
    names = set(re.findall(r"dist/(lmserve-[^\s'\[]+\.whl)", install_section()))
    assert len(names) == 1, names
    return names.pop()


def test_the_readme_installs_from_a_checkout_or_a_wheel_never_from_an_index() -> None:
    installs = re.findall(r"pip install ([^#\n]+)", README.read_text())
    assert installs, "the README shows how to install"
    for arguments in installs:
        for argument in arguments.split():
            name = argument.strip("'\"")
            # lmserve is named only as a path (a checkout, a wheel file), never as a bare
            # name that pip would look up on an index.
            if name.split("[")[0] == "lmserve":
                raise AssertionError(f"pip install {arguments.strip()}: lmserve is on no index")
    section = install_section()
    assert "python -m build --wheel" in section
    assert re.search(r"^pip install '\.\[server\]'", section, flags=re.M)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = source / "dist"
    # The README's command, without isolation: the build backend is this environment's.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel_file,) = dist.glob("*.whl")
    return wheel_file


def wheel_metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(name).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def test_the_wheel_is_the_one_the_readme_names_and_holds_both_packages(wheel: Path) -> None:
    assert wheel.name == readme_wheel_name()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for package, directory in (("lmserve", "client/lmserve"), ("lmserve_server", "server")):
        for module in (ROOT / directory).rglob("*.py"):
            relative = module.relative_to(ROOT / directory.split("/")[0])
            assert str(relative) in names, f"{relative} missing from the wheel ({package})"
    assert {"lmserve/py.typed", "lmserve/v1/lmserve_pb2.pyi"} <= names
    assert "lmserve_server/assets/gpt2-tokenizer/vocab.json" in names  # make-test-model's


def test_the_client_needs_grpcio_and_protobuf_and_the_server_extra_pins_torch(
    wheel: Path,
) -> None:
    requirements = wheel_metadata(wheel)
    plain = {r.name for r in requirements if r.marker is None}
    assert plain == set(CLIENT_DEPENDENCIES)
    server = {
        r.name: r for r in requirements if r.marker and r.marker.evaluate({"extra": "server"})
    }
    assert str(server["torch"].specifier) == "==2.13.0"
    assert {"torch", "transformers", "accelerate", "grpcio-health-checking"} <= server.keys()
    # `pip install 'dist/...whl[server]'` has nothing to download here: this environment
    # (make install, torch from local disk) satisfies every requirement of the extra.
    for requirement in server.values():
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            requirement,
            installed,
        )


def _link_distribution(name: str, site_packages: Path) -> None:
    """Makes distribution ``name`` of this environment importable in ``site_packages`` by
    linking its files (not its directories: ``google/`` is shared with other packages)."""
    for file in metadata.distribution(name).files or []:
        source = Path(str(file.locate())).resolve()
        if file.parts[0] == ".." or not source.is_file():
            continue  # a console script outside site-packages, or a listed but absent file
        target = site_packages / file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)


def test_the_client_only_wheel_installs_and_runs_without_torch(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
        check=True,
        timeout=300,
    )
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for name in (*CLIENT_DEPENDENCIES, *_requirements_of("grpcio")):
        _link_distribution(name, site_packages)
    # Every installed distribution's requirements are met: the client needs nothing more.
    subprocess.run([*pip, "check"], check=True, timeout=120)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.util, lmserve, lmserve.cli\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is in the throwaway venv'\n"
        "print(lmserve.__version__, lmserve.__file__)\n"
    )
    out = subprocess.run(
        [python, "-c", probe], check=True, capture_output=True, text=True, env=env, timeout=120
    ).stdout
    assert out.startswith("0.1.0 ") and str(site_packages) in out
    client = venv / "bin" / "lmserve-client"
    version = subprocess.run(
        [client, "--version"], check=True, capture_output=True, text=True, env=env, timeout=60
    )
    assert version.stdout.strip() == "lmserve-client 0.1.0"
    dead = subprocess.run(
        [client, "health", "--target", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert dead.returncode == 1 and dead.stderr.startswith("error: UNAVAILABLE"), dead.stderr


def _requirements_of(name: str) -> list[str]:
    """The names of what distribution ``name`` requires unconditionally (here)."""
    return [
        Requirement(r).name
        for r in metadata.requires(name) or []
        if Requirement(r).marker is None or Requirement(r).marker.evaluate()  # type: ignore[union-attr]
    ]
