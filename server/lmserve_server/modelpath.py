"""Whether ``--model`` names a local directory, and what is wrong with one that can't be.

A Hub name is ``name`` or ``owner/name``; anything that starts like a path (``/``, ``./``,
``../``, ``~``) or has more slashes is a local directory, and when it does not exist the
operator needs to hear exactly that, not that the Hub can't be reached. Torch-free, so the
CLI says it before importing anything heavy.
"""

from __future__ import annotations

import os


def looks_like_a_path(model: str) -> bool:
    return (
        model in (".", "..")
        or model.startswith(("/", "./", "../", "~"))
        or model.strip("/").count("/") > 1
    )


def local_model_problem(model: str) -> str | None:
    """Why ``model``, a local path, can't be a model directory; None when it may be one
    (an existing directory, or a Hub name)."""
    if os.path.isdir(model):
        return None
    if os.path.exists(model):
        return (
            f"--model {model!r} is a file: it must be a directory saved with save_pretrained "
            "(config.json, the weights and the tokenizer files)"
        )
    if looks_like_a_path(model):
        return (
            f"could not load model {model!r}: the directory {os.path.abspath(model)} does not "
            "exist. To try lmserve without a model: `lmserve make-test-model ./tiny-gpt2` then "
            "`lmserve serve --model ./tiny-gpt2`."
        )
    return None
