"""The README's commands work when pasted, and what it says users see is what they see.

The "Try it offline" block runs as written in a scratch directory (with this checkout's
``.venv`` linked in, as "after make install" has it): the daemon in the background, the
client commands right after it, ``kill %1`` at the end, and the daemon must drain and exit 0.
Only the port moves (LMSERVE_PORT / LMSERVE_TARGET), so that a daemon someone else runs on
50051 can't answer instead. grpcurl is no dependency of lmserve: where it is not installed
its lines are left out and what they claim is checked through the same proto3 JSON mapping.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from lmserve import FinishReason
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from tests.conftest import RunningDaemon
from tests.ops_support import free_port, run_group

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:50051"


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next ``## `` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def code_blocks(text: str, language: str = "bash") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_try_it_offline_works_when_pasted(tmp_path: Path) -> None:
    (block,) = code_blocks(section("Try it offline"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    lines = [line.replace(DEFAULT_ADDRESS, address) for line in commands(block)]
    if shutil.which("grpcurl") is None:
        lines = [line for line in lines if not line.startswith("grpcurl")]
    assert lines[-1].startswith("kill %1"), "the block stops the daemon it started"
    # -e: the first failing command fails the paste. The trap stops the daemon if the block
    # fails before its kill; `wait %1` hands back how the daemon ended.
    script = "\n".join(
        ["set -e", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT", *lines, "wait %1"]
    )
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {
        **_environment(),
        "LMSERVE_PORT": str(port),
        "LMSERVE_TARGET": address,
    }
    # The daemon the paste starts dies with the group if the paste fails or hangs.
    proc = run_group(["bash", "-c", script], cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout.splitlines()
    assert "15496 2159" in out, proc.stdout  # what the tokenize line's comment says
    assert "SERVING" in out, proc.stdout  # what the health line's comment says
    assert any(re.match(r"model\s+\./tiny-gpt2$", line) for line in out), proc.stdout
    assert "drain" in proc.stderr  # `kill %1`: it drained, and `wait %1` saw exit 0
    assert (tmp_path / "tiny-gpt2" / "model.safetensors").is_file()


def _environment() -> dict[str, str]:
    import os

    # The paste runs in a user's shell: none of the test run's LMSERVE_* settings.
    return {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}


def test_the_finish_reasons_are_named_as_users_see_them(daemon: RunningDaemon) -> None:
    api = section(
        "The API (`proto/lmserve/v1/lmserve.proto`, package `lmserve.v1`, service `Generator`)"
    )
    named = set(re.findall(r"`(FINISH_REASON_\w+)`", api))
    assert named == set(lmserve_pb2.FinishReason.keys()) - {"FINISH_REASON_UNSPECIFIED"}
    python_names = set(re.findall(r"printed as `(\w+)`, `(\w+)`, `(\w+)`", api)[0])
    assert python_names == {r.value for r in FinishReason} - {"unspecified"}

    # grpcurl prints the proto3 JSON mapping of the reply: the README's comment must be in it.
    (block,) = code_blocks(section("Try it offline"))
    generate = next(c for c in commands(block) if c.startswith("grpcurl") and "Generate" in c)
    request = json.loads(re.search(r"-d '(\{.*?\})'", generate).group(1))  # type: ignore[union-attr]
    claimed = generate.split("# ... ", 1)[1].strip()
    with grpc.insecure_channel(daemon.address) as channel:
        stub = lmserve_pb2_grpc.GeneratorStub(channel)
        reply = stub.Generate(json_format.ParseDict(request, lmserve_pb2.GenerateRequest()))
    # grpcurl names fields in lowerCamelCase by default and as in the proto with
    # -keep-proto-names: what the comment shows must be in both, and README names both.
    for proto_names in (False, True):
        printed = json_format.MessageToJson(
            reply, indent=None, preserving_proto_field_name=proto_names
        )
        assert claimed in printed, printed
    said = section("Try it offline")
    assert "`finishReason`" in said and "`finish_reason`" in said and "-keep-proto-names" in said
