"""Whether ``--model`` names a local directory or GGUF file, and what is wrong with one that
can't be served.

A Hub name is ``name`` or ``owner/name``; anything that starts like a path (``/``, ``./``,
``../``, ``~``), has more slashes, or whose first part is a directory here
(``models/tiny-gpt3`` next to ``models/``) is a local directory, and when it does not exist
the operator needs to hear exactly that, not that the Hub can't be reached. A directory that
exists but holds no model (``--model /tmp``) is said to miss what it misses, not left to the
tokenizer's guess ("sentencepiece or tiktoken is missing"). Torch-free, so the CLI says it
before importing anything heavy.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from lmserve_server.gguf_file import GgufError, gguf_file_of, read_gguf

# What from_pretrained reads: the config, the weights (one file or a sharded index) and a
# tokenizer in one of its forms (fast, GPT-2 style BPE, sentencepiece, WordPiece, tiktoken).
_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_TOKENIZER = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "*.tiktoken",
)
_TRY_IT = (
    "To try lmserve without a model: `lmserve make-test-model ./tiny-gpt2` then "
    "`lmserve serve --model ./tiny-gpt2`."
)


def looks_like_a_path(model: str) -> bool:
    first = model.split("/", 1)[0]
    return (
        model in (".", "..")
        or model.startswith(("/", "./", "../", "~"))
        or model.strip("/").count("/") > 1
        or ("/" in model and first not in ("", ".", "..") and os.path.isdir(first))
    )


def local_model_problem(model: str) -> str | None:
    """Why ``model``, a local path, can't be served; None when it may be (a directory with a
    config, weights and a tokenizer, a GGUF file or a directory holding one, or a Hub name)."""
    try:
        gguf = gguf_file_of(model)
        if gguf is not None:
            read_gguf(gguf)
            return None
    except GgufError as err:
        return str(err)
    if os.path.isdir(model):
        return _directory_problem(model)
    if os.path.exists(model):
        return (
            f"--model {model!r} is a file but not a GGUF file: it must be a .gguf file or a "
            "directory saved with save_pretrained (config.json, the weights and the tokenizer "
            "files)"
        )
    if looks_like_a_path(model):
        return (
            f"could not load model {model!r}: no such directory: {os.path.abspath(model)} "
            f"does not exist{_close_names(model)}. {_TRY_IT}"
        )
    return None


def hub_model_problem(model: str) -> str | None:
    """For a Hub name (``model`` is no directory here): why it can't be loaded, found before
    torch is imported: it is not in the Hugging Face cache and the Hub can't be reached (or
    HF_HUB_OFFLINE is set). None when it is cached, the Hub answers, or huggingface_hub (a
    dependency of the server extra) is not installed."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repository id: from_pretrained will say so
        return None
    if isinstance(cached, str):
        return None
    try:
        check_hub_reachable()
    except OSError as err:
        here = os.path.abspath(model)
        return hub_failure_message(model, f"no directory {here} here, and {err}")
    return None


def check_hub_reachable(timeout_s: float = 3.0) -> None:
    """Raises OSError at once when the Hub can't be reached, instead of after its retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise OSError("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise OSError(
            f"it is not in the Hugging Face cache and {host} can't be reached ({err})"
        ) from err


def hub_failure_message(model: str, reason: str) -> str:
    """One line: a Hub model that could not be loaded, why, and what to do."""
    return (
        f"could not load model {model!r}: {reason}. "
        "If this machine is offline, the weights must already be in the Hugging Face cache "
        f"(fetch them on a connected machine with `hf download {model}`, then copy "
        "~/.cache/huggingface) or --model must name a local directory saved with "
        f"save_pretrained. {_TRY_IT}"
    )


def _directory_problem(model: str) -> str | None:
    """What an existing directory lacks to be a model, or None when it has it all."""
    directory = Path(model)

    def has(patterns: tuple[str, ...]) -> bool:
        return any(next(directory.glob(p), None) is not None for p in patterns)

    missing = []
    if not (directory / "config.json").is_file():
        missing.append("no config.json")
    if not has(_WEIGHTS):
        missing.append("no weights (model.safetensors or pytorch_model.bin, or a sharded index)")
    if not has(_TOKENIZER):
        missing.append(
            "no tokenizer files (tokenizer.json, or vocab.json and merges.txt, or tokenizer.model)"
        )
    if not missing:
        return None
    return (
        f"--model {model!r}: the directory {os.path.abspath(model)} holds no model: it has "
        f"{', '.join(missing)}. A model directory is one written by save_pretrained (or "
        f"`hf download NAME --local-dir DIR`), or one holding a single .gguf file. {_TRY_IT}"
    )


def _close_names(model: str) -> str:
    """', did you mean ...?' naming entries of the parent directory like the missing one."""
    path = Path(os.path.expanduser(model))
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    if not close:
        return ""
    shown = " or ".join(repr(str(parent / name)) for name in close)
    return f" (did you mean {shown}?)"
