"""requirements.lock: write it from a resolved environment, or check an environment and
pyproject.toml against it.

    python tools/check_lock.py --write requirements.lock   # `make lock`, in its throwaway venv
    python tools/check_lock.py --installed                 # `make install`, after installing
    python tools/check_lock.py                             # the lock against pyproject.toml

The lock pins every distribution of the environment that `pip install '.[server,dev,plot]'`
resolved (pip and setuptools included: the editable install builds without isolation, so
the build backend is locked too). torch is written without its local label (``+cpu``) so the
same line takes the CPU build here and a CUDA build where that is the one on offer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Iterable
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
EXTRAS = ("server", "dev", "plot")
HEADER = """\
# The versions `make install`, CI (.ci/run), the Docker image and the GPU check's wheels
# install. Written by tools/check_lock.py from a resolve of pyproject.toml's
# [server,dev,plot] extras, holding what requirements-hold.txt holds: `make lock` after a
# requirement changed (the rest stays), `make upgrade` for the newest of everything (then
# the suite). Do not edit by hand.
"""


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and those of the extras the lock covers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def lock_problems(pins: dict[str, Version], requirements: Iterable[Requirement]) -> list[str]:
    """Each requirement of pyproject.toml the lock misses or pins outside its range."""
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        pinned = pins.get(name)
        if pinned is None:
            problems.append(f"{req.name} is required by pyproject.toml but not in the lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"the lock pins {req.name}=={pinned}, outside pyproject's {req}")
    return problems


def installed() -> dict[str, Version]:
    found = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name != "lmserve":
            found[name] = Version(dist.version)
    return found


def install_problems(pins: dict[str, Version], have: dict[str, Version]) -> list[str]:
    """Each installed distribution at another version than the lock's, or missing."""
    problems = []
    for name, version in sorted(pins.items()):
        got = have.get(name)
        if got is None:
            problems.append(f"{name}=={version} is locked but not installed")
        elif got.public != version.public:
            problems.append(f"{name} is installed at {got}, the lock says {version}")
    return problems


def write_lock(path: Path) -> None:
    have = installed()
    lines = [f"{name}=={version.public}" for name, version in sorted(have.items())]
    path.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{path.name}: {len(lines)} pins (transformers=={have.get('transformers')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the lock from here")
    parser.add_argument(
        "--installed", action="store_true", help="also check this environment against the lock"
    )
    args = parser.parse_args(argv)
    if args.write:
        write_lock(args.write)
    pins = read_lock(args.write or LOCK)
    problems = lock_problems(pins, project_requirements())
    if args.installed:
        problems += install_problems(pins, installed())
    for problem in problems:
        print(f"requirements.lock: {problem}", file=sys.stderr)
    if problems:
        print("run `make lock` (or `make upgrade`) to re-lock", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
