"""The C heap, where the grammar library keeps a compiled grammar: how much it has handed out
(what the probe weighs a grammar at) and giving freed pages back to the system (after the
grammar cache evicts, so the process's resident memory follows the cache's bytes).

glibc only (``mallinfo2``, ``malloc_trim``); elsewhere a grammar weighs nothing but its text
and nothing is given back.
"""

from __future__ import annotations

import ctypes
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


_MALLINFO2 = _libc_function("mallinfo2")
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2
_MALLOC_TRIM = _libc_function("malloc_trim")


def heap_bytes() -> int:
    """Bytes the C heap has handed out and not had back (every arena, and mmapped blocks)."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def release_free_heap() -> None:
    """Gives the heap's free pages back to the system (a few milliseconds)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
