"""What a request whose rows failed on the device is told (the one home of that rule, for
the static engine's ``generate`` and the continuous runner's steps)."""

from __future__ import annotations

import torch

from lmserve_server.errors import OutOfMemoryError


def out_of_memory(err: torch.OutOfMemoryError, doing: str) -> OutOfMemoryError:
    """Running out of device memory ``doing`` something: the device's cached blocks are given
    back first (so that a retry of fewer rows can fit), and the caller gets
    ``OutOfMemoryError`` (RESOURCE_EXHAUSTED) saying what ran out."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return OutOfMemoryError(f"out of device memory {doing}")
