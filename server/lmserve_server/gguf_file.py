"""A GGUF file (llama.cpp's format) checked before it is loaded: the header, its metadata,
and every tensor's type and extent, read straight from the file.

transformers loads a GGUF file by parsing all of it in Python (seconds) and fails on a
truncated one with a numpy reshape error, on an unsupported quantization deep inside
dequantizing; this reads what it needs in milliseconds and says what is wrong in one line,
before anything heavy is imported or a port is bound. Torch-free: only the ``gguf``
package's constants and its dequantizer (numpy) are used.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
SUFFIX = ".gguf"
# Metadata value types (GGUFValueType): the fixed-size ones' struct formats.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
# Token ids that end a turn in chat models, beside tokenizer.ggml.eos_token_id.
_END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# The metadata read here; the rest (the vocabulary above all) is skipped over.
_WANTED = frozenset(
    {
        "general.architecture",
        "general.file_type",
        "general.alignment",
        "general.name",
        "tokenizer.ggml.eos_token_id",
        *_END_OF_TURN_KEYS,
    }
)


class GgufError(ValueError):
    """A GGUF file that can't be served: one line naming the file and the problem."""


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    architecture: str
    # llama.cpp's name of the quantization, e.g. "Q4_1", "F16".
    file_type: str
    # Every tensor type in the file, e.g. {"Q4_1", "F32"}.
    tensor_types: frozenset[str]
    # Tokens that end a turn besides EOS (end of turn, end of message), when the file says.
    end_of_turn_token_ids: tuple[int, ...]


def gguf_file_of(model: str) -> Path | None:
    """The GGUF file ``--model`` names: a ``.gguf`` file, or a directory holding exactly one
    and no ``config.json`` (a save_pretrained directory is served as one). None otherwise;
    a directory with several is ``GgufError``, naming them."""
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX or _starts_with_magic(path) else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GgufError(
            f"--model {model!r}: the directory holds {len(found)} GGUF files ({names}): "
            f"name one, e.g. --model {path / found[0].name}"
        )
    return found[0] if found else None


def read_gguf(path: Path) -> GgufSummary:
    """The file's summary, after checking that every tensor lies inside the file and has a
    type the loader can dequantize; ``GgufError`` otherwise."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 24:
                raise GgufError(f"GGUF file {path}: {size} bytes, too short to be one")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _Parser(path, data, size).summary()
    except OSError as err:
        raise GgufError(f"GGUF file {path}: cannot read it: {err.strerror or err}") from None


def _starts_with_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == MAGIC
    except OSError:
        return False


class _Truncated(Exception):
    pass


class _Parser:
    def __init__(self, path: Path, data: mmap.mmap, size: int) -> None:
        self._path = path
        self._data = data
        self._size = size
        self._at = 0

    def _fail(self, problem: str) -> GgufError:
        return GgufError(f"GGUF file {self._path}: {problem}")

    def _read(self, fmt: str) -> int | float | bool:
        width = struct.calcsize("<" + fmt)
        if self._at + width > self._size:
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self._data, self._at)
        self._at += width
        return value

    def _count(self) -> int:
        return int(self._read("Q"))

    def _string(self) -> str:
        length = self._count()
        if self._at + length > self._size:
            raise _Truncated
        raw = self._data[self._at : self._at + length]
        self._at += length
        return raw.decode("utf-8", errors="replace")

    def _value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self._read(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = int(self._read("I")), self._count()
            if item_kind in _SCALARS:  # skipped in one jump
                width = struct.calcsize("<" + _SCALARS[item_kind])
                self._at += width * count
                if self._at > self._size:
                    raise _Truncated
                return None
            for _ in range(count):
                self._value(item_kind)
            return None
        raise self._fail(f"metadata value of unknown type {kind}: the file is corrupt")

    def summary(self) -> GgufSummary:
        try:
            return self._summary()
        except _Truncated:
            raise self._fail(
                f"truncated: the file ends at byte {self._size} inside its header (an "
                "interrupted download or copy?): fetch or copy it again"
            ) from None

    def _summary(self) -> GgufSummary:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

        if self._data[:4] != MAGIC:
            raise self._fail("not a GGUF file (it does not start with 'GGUF')")
        self._at = 4
        version = int(self._read("I"))
        if version not in (2, 3):
            raise self._fail(f"GGUF version {version}: only versions 2 and 3 can be read")
        tensor_count, kv_count = self._count(), self._count()
        meta: dict[str, object] = {}
        for _ in range(kv_count):
            key = self._string()
            kind = int(self._read("I"))
            value = self._value(kind)
            if key in _WANTED:
                meta[key] = value
        tensors: list[tuple[str, int, int, int]] = []  # name, type, elements, offset
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._count() for _ in range(int(self._read("I")))]
            elements = 1
            for dim in dims:
                elements *= dim
            tensors.append((name, int(self._read("I")), elements, self._count()))
        alignment = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
        data_start = -(-self._at // alignment) * alignment
        types: Counter[str] = Counter()
        for name, kind, elements, offset in tensors:
            try:
                qtype = GGMLQuantizationType(kind)
            except ValueError:
                raise self._fail(
                    f"tensor {name!r} has type {kind}, unknown to this gguf package"
                ) from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            end = data_start + offset + elements // block * block_bytes
            if end > self._size:
                raise self._fail(
                    f"truncated: tensor {name!r} ends at byte {end} but the file has "
                    f"{self._size} (an interrupted download or copy?): fetch or copy it again"
                )
            types[qtype.name] += 1
        unsupported = sorted(t for t in types if not _can_dequantize(GGMLQuantizationType[t]))
        if unsupported:
            raise self._fail(
                f"tensors of type {', '.join(unsupported)}, which the gguf package can't "
                "dequantize: use a file of another quantization (Q4_0, Q4_1, Q5_0, Q5_1, "
                "Q8_0, the K-quants, F16, BF16 and F32 can be served)"
            )
        architecture = meta.get("general.architecture")
        if not isinstance(architecture, str):
            raise self._fail("no general.architecture in its metadata: the file is corrupt")
        file_type = meta.get("general.file_type")
        try:
            if not isinstance(file_type, int):
                raise ValueError(file_type)
            type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:  # absent or unknown: the commonest type of a weight matrix
            type_name = types.most_common(1)[0][0] if types else "none"
        end_of_turn = tuple(
            int(meta[key])  # type: ignore[call-overload]
            for key in _END_OF_TURN_KEYS
            if isinstance(meta.get(key), int)
        )
        return GgufSummary(
            path=self._path,
            architecture=architecture,
            file_type=type_name.replace("ALL_", ""),
            tensor_types=frozenset(types),
            end_of_turn_token_ids=end_of_turn,
        )


def _can_dequantize(qtype: object) -> bool:
    """Whether the gguf package (what transformers dequantizes with) handles ``qtype``: one
    block of zero bytes is dequantized to find out."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants

    _, block_bytes = GGML_QUANT_SIZES[qtype]  # type: ignore[index]
    try:
        quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)  # type: ignore[arg-type]
    except NotImplementedError:
        return False
    except Exception:  # a dequantizer that exists but dislikes zeros is still one it has
        return True
    return True
