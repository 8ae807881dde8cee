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


def test_the_readme_is_in_a_newcomers_order_with_the_internals_elsewhere() -> None:
    """Issue 19: how batching works sat between the API and operations."""
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.M)
    wanted = [
        "The two commands",
        "Try it offline",
        "Coming from vLLM, TGI or Triton",
        "The API",
        "The Python client",
        "Operations",
        "Troubleshooting",
    ]
    positions = [next(i for i, h in enumerate(headings) if h.startswith(w)) for w in wanted]
    assert positions == sorted(positions), headings
    assert not any("How batching works" in h for h in headings)
    architecture = README.parent / "docs" / "ARCHITECTURE.md"
    assert "## How batching works" in architecture.read_text()
    assert "(docs/ARCHITECTURE.md)" in README.read_text()


def test_the_comparison_says_what_lmserve_has_not() -> None:
    table = section("Coming from vLLM, TGI or Triton")
    for row in (
        "**no tool calling, embeddings, Responses API or `echo`**",
        "| quantization | **none**",
        "| LoRA adapters | **none**",
        "| tensor / pipeline parallelism | **none**",
        "have never run on a GPU",
        "only once, before the current engine core",
    ):
        assert row in table, row


def test_the_client_section_names_every_public_method_and_error() -> None:
    import inspect

    import lmserve

    client = section("The Python client")
    for cls in (lmserve.Client, lmserve.AsyncClient):
        public = [n for n, _ in inspect.getmembers(cls, inspect.isfunction) if n[0] != "_"]
        assert public, cls
        for name in public:
            assert f"`{name}(" in client, f"{cls.__name__}.{name}"
    errors = [n for n in lmserve.__all__ if n.endswith("Error") and n != "LmserveError"]
    for name in errors:
        assert f"`{name}`" in client, name


def test_the_client_example_runs(daemon: RunningDaemon, tmp_path: Path) -> None:
    (example,) = code_blocks(section("The Python client"), "python")
    script = tmp_path / "example.py"
    script.write_text(example.replace(DEFAULT_ADDRESS, daemon.address))
    done = run_group([sys.executable, str(script)], timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "SERVING"
    assert lines[1].split()[1:] == ["static", "32", "1024"], lines[1]


def test_the_readme_states_the_daemons_memory() -> None:
    memory = section("Operations").split("### Memory", 1)[1].split("\n### ", 1)[0]
    for part in (
        "the weights",
        "packed copy",
        "compiled kernels",
        "KV cache",
        "prefix cache",
        "grammars",
    ):
        assert part in memory, part
