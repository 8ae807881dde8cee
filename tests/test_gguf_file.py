"""A GGUF file checked before it is loaded (``gguf_file.py``): small files written with the
gguf package's own writer (as llama.cpp's converters write them), then cut or given a type
the loader can't dequantize; and ``lmserve serve`` refusing such a file with one line before
it loads anything or binds a port."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from lmserve_server.gguf_file import GgufError, gguf_file_of, read_gguf
from lmserve_server.modelpath import local_model_problem


def write_gguf(
    path: Path,
    *,
    raw_type: GGMLQuantizationType = GGMLQuantizationType.Q4_1,
    eot: int | None = None,
) -> Path:
    """A llama-architecture GGUF with a float32 norm and one quantized 64 x 64 weight."""
    writer = GGUFWriter(path, "llama")  # writes general.architecture itself
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_1)
    writer.add_token_list(["a", "b", "c"])  # a string array, skipped over
    writer.add_eos_token_id(2)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    block, block_bytes = GGML_QUANT_SIZES[raw_type]
    raw = np.zeros((64, 64 // block * block_bytes), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cut(source: Path, target: Path, size: int) -> Path:
    target.write_bytes(source.read_bytes()[:size])
    return target


def test_a_whole_file_is_summarised(tmp_path: Path) -> None:
    summary = read_gguf(write_gguf(tmp_path / "m.gguf", eot=7))
    assert summary.architecture == "llama"
    assert summary.file_type == "Q4_1"
    assert summary.tensor_types == {"F32", "Q4_1"}
    assert summary.end_of_turn_token_ids == (7,)


def test_a_file_cut_inside_its_tensors_is_truncated_naming_the_tensor(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "m.gguf")
    short = cut(whole, tmp_path / "short.gguf", whole.stat().st_size - 100)
    with pytest.raises(GgufError, match=r"truncated: tensor 'blk.0.attn_q.weight' ends at byte"):
        read_gguf(short)


@pytest.mark.parametrize("size", [4, 30, 200])
def test_a_file_cut_inside_its_header_is_truncated(tmp_path: Path, size: int) -> None:
    short = cut(write_gguf(tmp_path / "m.gguf"), tmp_path / "short.gguf", size)
    with pytest.raises(GgufError, match=r"too short|truncated: the file ends at byte"):
        read_gguf(short)


def test_an_unsupported_quantization_is_named(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", raw_type=GGMLQuantizationType.Q8_1)
    with pytest.raises(GgufError, match="tensors of type Q8_1, which the gguf package can't"):
        read_gguf(path)


def test_a_file_that_is_not_gguf_is_said_to_be_so(tmp_path: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_gguf(path)


def test_a_directory_with_one_gguf_file_serves_it_and_with_two_names_them(
    tmp_path: Path,
) -> None:
    one = write_gguf(tmp_path / "a.gguf")
    assert gguf_file_of(str(tmp_path)) == one
    assert gguf_file_of(str(one)) == one
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(GgufError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\): name one"):
        gguf_file_of(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # a save_pretrained directory is not one
    assert gguf_file_of(str(tmp_path)) is None


def test_a_file_that_is_no_gguf_is_no_model(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert gguf_file_of(str(other)) is None
    problem = local_model_problem(str(other))
    assert problem is not None and "is a file but not a GGUF file" in problem


def test_serve_refuses_a_truncated_file_with_one_line_before_loading(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "m.gguf")
    short = cut(whole, tmp_path / "short.gguf", whole.stat().st_size - 100)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lmserve_server.cli", "serve", "--model", str(short), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lmserve: error: GGUF file {short}: truncated: tensor")
    assert "fetch or copy it again" in lines[0]
    # Refused before torch is imported or a model loaded (seconds), let alone a port bound.
    assert time.monotonic() - started < 20
