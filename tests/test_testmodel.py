"""``lmserve make-test-model``: the checkpoint it writes is readable like any other
``save_pretrained`` output under the caller's umask, so a daemon running as another user
(systemd's DynamicUser, a container's non-root user) can load it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmserve_server.testmodel import current_umask, write_test_model


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_every_file_gets_the_mode_the_umask_allows(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        written = write_test_model(tmp_path / "model", size="tiny")
    finally:
        os.umask(previous)
    found = modes(written)
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt"} <= found.keys()
    assert found == dict.fromkeys(found, mode), {k: oct(v) for k, v in found.items()}


def test_the_command_writes_group_and_world_readable_weights(tmp_path: Path) -> None:
    # What a user runs, in a process of its own with the usual umask.
    subprocess.run(
        [sys.executable, "-m", "lmserve_server.cli", "make-test-model", str(tmp_path / "m")],
        check=True,
        capture_output=True,
        preexec_fn=lambda: os.umask(0o022),
        timeout=300,
    )
    found = modes(tmp_path / "m")
    assert found["model.safetensors"] == 0o644
    assert not [name for name in found if name.startswith(".")], "no scratch directory left"
