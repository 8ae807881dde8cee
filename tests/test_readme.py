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
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from lmserve import FinishReason
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.config import ServerConfig
from tests.conftest import RunningDaemon, engine_for
from tests.ops_support import free_port, make_pki, run_group

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
    """A newcomer reads top down: running it, the API, operating it; how batching works
    inside belongs in docs/, not between the API and operations."""
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


# The README's Python blocks, in order. Each runs as written, as a script in a scratch
# directory, against a real daemon on loopback; only the address moves to that daemon's.
def python_blocks() -> dict[str, str]:
    """Each ```python block of the README by the heading it sits under (numbered when a
    heading holds more than one)."""
    text = README.read_text()
    blocks: dict[str, str] = {}
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        heading = re.findall(r"^#+ (.+)$", text[: match.start()], flags=re.M)[-1]
        name = heading.split("(")[0].strip()
        while name in blocks:
            name += "+"
        blocks[name] = match.group(1)
    return blocks


# The HTTP API's block speaks to an HTTP port, not gRPC: tests/test_openai_http.py runs it
# as written against a daemon serving one (test_the_readme_examples_run).
PYTHON_BLOCKS = {
    under: block for under, block in python_blocks().items() if "import openai" not in block
}
# A chat template for the tiny GPT-2 (which has none), as ``--chat-template`` gives one.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TLS_ADDRESS = "lm.internal:50051"
TOKEN = "readme-token"


@pytest.fixture(scope="module")
def continuous_daemon(
    daemon_config: ServerConfig,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningDaemon]:
    """Where the structured-output and prefix-caching blocks need a daemon: a chat template
    for their messages, the continuous scheduler for the prefix cache."""
    template = tmp_path_factory.mktemp("chat") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    config = replace(
        daemon_config,
        scheduler="continuous",
        chat_template=str(template),
        max_batch_size=4,
        kv_cache_tokens=4096,
    )
    running = RunningDaemon(config, engine_for(config, request))
    yield running
    running.stop()


def run_block(block: str, address: str, cwd: Path, **env: str) -> list[str]:
    """``block`` as a script, its addresses moved to ``address``; its stdout lines."""
    script = cwd / "snippet.py"
    script.write_text(block.replace(DEFAULT_ADDRESS, address).replace(TLS_ADDRESS, address))
    done = run_group(
        [sys.executable, str(script)], cwd=cwd, env={**_environment(), **env}, timeout=240
    )
    assert done.returncode == 0, f"{block}\n{done.stdout}{done.stderr}"
    return done.stdout.splitlines()


def test_the_readme_has_python_blocks_to_run() -> None:
    assert len(PYTHON_BLOCKS) >= 6, "the blocks below are picked by what they use"


@pytest.mark.parametrize("under", PYTHON_BLOCKS)
def test_every_python_block_runs_as_written(
    under: str,
    daemon: RunningDaemon,
    continuous_daemon: RunningDaemon,
    make_daemon,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    block = PYTHON_BLOCKS[under]
    if "tls_ca=" in block:  # mutual TLS and a token: the files and variable it names
        pki = make_pki(tmp_path / "pki")
        for source, name in (
            (pki.ca, "ca.crt"),
            (pki.client_cert, "me.crt"),
            (pki.client_key, "me.key"),
        ):
            shutil.copy(source, tmp_path / name)
        secure: RunningDaemon = make_daemon(
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca),
            auth_token=TOKEN,
        )
        run_block(block, f"localhost:{secure.port}", tmp_path, LMSERVE_TOKEN=TOKEN)
    elif "AsyncClient" in block:  # the client section's example, on the default daemon
        lines = run_block(block, daemon.address, tmp_path)
        assert lines[0] == "SERVING"
        assert lines[1].split()[1:] == ["static", "32", "1024"], lines[1]
    elif "structured_output" in block:
        lines = run_block(block, continuous_daemon.address, tmp_path)
        assert lines[0].startswith('{"city":"'), lines  # the schema's first key, compact
    elif "cache_salt" in block:
        lines = run_block(block, continuous_daemon.address, tmp_path)
        first, again = map(int, lines[-1].split())
        assert first == 0 and again >= 4 * 32, lines  # the system prompt's full blocks
    else:
        run_block(block, continuous_daemon.address, tmp_path)


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


def shown(default: object) -> str:
    """A flag's default as the README's tables write it."""
    if isinstance(default, bool):
        return str(default).lower()
    if default is None:
        return "unset"
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_the_flag_tables_agree_with_serve_help() -> None:
    """Every flag row of the README's tables gives the default ``lmserve serve`` has, and
    the two say the same of the warm-up and of a packed kernel's size."""
    from lmserve_server.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    actions = {a.option_strings[0]: a for a in serve._actions if a.option_strings}
    rows = re.findall(r"^\| `(--[\w-]+)` \| ([^|]*) \| ([^|]*) \|$", README.read_text(), re.M)
    assert len(rows) >= 25, rows
    for flag, default, _ in rows:
        wanted = actions[flag].default
        assert default.strip("` ").split(" ")[0] == shown(wanted), (flag, default, wanted)
    said = {flag: text for flag, _, text in rows}
    for flag, fact in (("--warm-up", "two short requests"), ("--pack-weights", "0.6 MB")):
        assert fact in (actions[flag].help or ""), flag
        readme = said[flag] if fact in said[flag] else section("Operations")
        assert fact in readme, flag
