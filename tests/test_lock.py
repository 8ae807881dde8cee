"""requirements.lock: every requirement of pyproject.toml is pinned inside its range, and
this environment (made by `make install`) is the one the lock names."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import check_lock


def test_the_lock_pins_every_requirement_inside_its_range() -> None:
    pins = check_lock.read_lock()
    assert check_lock.lock_problems(pins, check_lock.project_requirements()) == []
    assert "torch" in pins and "transformers" in pins and "pip" in pins


def test_a_requirement_outside_the_lock_or_its_range_is_named() -> None:
    pins = {"transformers": Version("5.24.0")}
    problems = check_lock.lock_problems(
        pins, [Requirement("transformers>=5.25"), Requirement("llguidance>=1.9")]
    )
    assert problems == [
        "the lock pins transformers==5.24.0, outside pyproject's transformers>=5.25",
        "llguidance is required by pyproject.toml but not in the lock",
    ]


def test_this_environment_is_the_locked_one() -> None:
    assert check_lock.install_problems(check_lock.read_lock(), check_lock.installed()) == []


def test_held_versions_are_the_locked_ones() -> None:
    pins = check_lock.read_lock()
    held = check_lock.read_lock(check_lock.ROOT / "requirements-hold.txt")
    assert held and all(pins[name] == version for name, version in held.items())
