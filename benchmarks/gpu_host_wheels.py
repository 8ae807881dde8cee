"""The wheels an offline GPU host needs to run lmserve (and, with ``--peer``, ``transformers
serve``) from a checkout, at the versions requirements.lock names.

    python benchmarks/gpu_host_wheels.py [--peer] [--dest .whl]

The host (``gpu_host_packages.txt``: Python 3.12, torch, no registry) has some of what the
daemon needs. Starting from pyproject.toml's requirements and its server extra, every
requirement is followed through the wheels' own metadata (markers evaluated for the host's
Python 3.12 on x86-64 Linux): a package the host has at the lock's version (or, when the
lock has none, at a version that satisfies it) stays the host's; any other is downloaded,
at the lock's version when the lock has it (else the newest that satisfies), so the host
runs the transformers and the rest that CI tested. torch, triton and numpy are always the
host's own. The result imports
there with the host's versions of the rest (``tests/test_gpu_host_wheels.py`` checks that
in a clean Python 3.12). On the host:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/server:$PWD/client
"""

from __future__ import annotations

import argparse
import email.parser
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from check_lock import read_lock  # noqa: E402

HOST_LIST = Path(__file__).with_name("gpu_host_packages.txt")
# Always the host's: its CUDA builds are what the check measures, and numpy is what that
# torch was built against (and 16 MB a wheel).
HOST_ONLY = {"torch", "triton", "numpy"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# What the markers of a wheel's requirements see on the host.
HOST_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def read_host(path: Path = HOST_LIST) -> dict[str, Version]:
    """The host's packages whose versions are known (``python`` included)."""
    host = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            host[canonicalize_name(name)] = Version(version)
    return host


def roots(peer: bool) -> list[Requirement]:
    """lmserve's requirements with the server extra (and the peer's, with ``peer``)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["server"]
    reqs = [Requirement(line) for line in lines]
    if peer:
        reqs.append(Requirement("transformers[serving]"))
    return reqs


def wheel_requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the host with ``extras`` asked for."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    wanted = []
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(
            req.marker.evaluate({**HOST_MARKERS, "extra": extra}) for extra in extras | {""}
        ):
            wanted.append(req)
    return wanted


def download(specs: list[str], dest: Path) -> dict[str, Path]:
    """One wheel for the host per spec (no dependencies), into ``dest``, in one pip call;
    by canonical name."""
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", tmp, *specs],
            check=True,
        )  # fmt: skip
        wheels = {}
        for wheel in Path(tmp).glob("*.whl"):
            name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
            wheels[name] = Path(shutil.move(str(wheel), dest / wheel.name))
        return wheels


def _host_has(
    name: str, req: Requirement, host: dict[str, Version], pins: dict[str, Version]
) -> bool:
    """Whether the host's own copy serves ``req``: it satisfies it and is the version the
    lock names (or the lock names none), so the host runs what CI tested."""
    version = host.get(name)
    return (
        version is not None
        and req.specifier.contains(version, True)
        and pins.get(name, version) == version
    )


def carry(dest: Path, peer: bool = False) -> dict[str, Version]:
    """Downloads into ``dest`` every wheel the host lacks; returns {name: version}. Breadth
    first, one pip call per level of requirements."""
    pins, host = read_lock(), read_host()
    dest.mkdir(parents=True, exist_ok=True)
    carried: dict[str, tuple[Version, Path]] = {}
    followed: dict[str, set[str]] = {}  # the extras whose requirements were queued ("" = base)
    level = roots(peer)
    while level:
        wanted = {}
        for req in level:
            name = canonicalize_name(req.name)
            if name in HOST_ONLY or _host_has(name, req, host, pins) or name in carried:
                continue
            locked = pins.get(name)
            fits = locked is not None and req.specifier.contains(locked, True)
            wanted.setdefault(
                name, f"{req.name}=={locked}" if fits else f"{req.name}{req.specifier}"
            )
        for name, wheel in download(list(wanted.values()), dest).items() if wanted else ():
            carried[name] = (parse_wheel_filename(wheel.name)[1], wheel)
            followed[name] = set()
        next_level: list[Requirement] = []
        for req in level:
            name = canonicalize_name(req.name)
            if name not in carried:
                continue
            version, wheel = carried[name]
            if not req.specifier.contains(version, True):
                raise SystemExit(f"{req} conflicts with the carried {name}=={version}")
            extras = set(req.extras) | {""}
            if not extras <= followed[name]:
                next_level += wheel_requirements(wheel, extras - followed[name])
                followed[name] |= extras
        level = next_level
    return {name: version for name, (version, _) in carried.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", action="store_true", help="also what `transformers serve` needs")
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    carried = carry(args.dest, args.peer)
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) / 2**20
    print(f"{len(carried)} wheels, {size:.1f} MiB in {args.dest}:")
    print(" ".join(f"{name}=={version}" for name, version in sorted(carried.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
