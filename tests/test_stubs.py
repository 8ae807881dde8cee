"""The committed stubs must be what protoc makes of the committed .proto (`make proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = ("lmserve_pb2.py", "lmserve_pb2.pyi", "lmserve_pb2_grpc.py")


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        str(ROOT / "proto" / "lmserve" / "v1" / "lmserve.proto"),
    ]
    assert protoc.main(args) == 0
    for name in STUBS:
        fresh = (tmp_path / "lmserve" / "v1" / name).read_text()
        committed = (ROOT / "client" / "lmserve" / "v1" / name).read_text()
        assert fresh == committed, f"client/lmserve/v1/{name} is stale: run `make proto`"
