"""Tests of the thin client (Client, AsyncClient, the CLI) against a real gRPC server.

The server runs on loopback with a fake ``GeneratorServicer`` defined here, which records
what it receives and answers canned values, so these tests check the client's side of
the contract (request building, conversion, error mapping, timeouts) without a model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

import lmserve
from lmserve import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FinishReason,
    GenerationResult,
    InternalError,
    InvalidArgumentError,
    LmserveError,
    ModelInfo,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RequestCancelledError,
    StreamChunk,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from lmserve.cli import main
from lmserve.types import build_request
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc

OPTIONAL_FIELDS = ("temperature", "top_p", "top_k", "seed")

STREAM_PIECES = [("Hel", [10]), ("lo", [11]), (" world", [12, 13])]

MODEL_INFO = lmserve_pb2.ModelInfo(
    model="sshleifer/tiny-gpt2",
    device="cpu",
    dtype="float32",
    max_context=1024,
    eos_token_id=50256,
    max_batch_size=8,
    max_wait_ms=5.0,
    max_new_tokens_cap=256,
    default_max_new_tokens=32,
)

# Each mapped code, the class it must become, and one code without a class of its own.
CODE_CLASSES: list[tuple[grpc.StatusCode, type[LmserveError]]] = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError),
    (grpc.StatusCode.INTERNAL, InternalError),
    (grpc.StatusCode.CANCELLED, RequestCancelledError),
    (grpc.StatusCode.FAILED_PRECONDITION, LmserveError),
]


class FakeGenerator(lmserve_pb2_grpc.GeneratorServicer):
    """Answers canned values; tests steer it through the attributes set in __init__."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        # (code, details) to abort every call with.
        self.abort: tuple[grpc.StatusCode, str] | None = None
        # Seconds to hold each call before answering (ends early if the client goes).
        self.delay_s = 0.0
        # GenerateStream: abort with this after the first chunk.
        self.abort_mid_stream: tuple[grpc.StatusCode, str] | None = None
        # GenerateStream: after the first chunk, wait for the client to cancel.
        self.hang_mid_stream = False
        self.stream_cancelled = threading.Event()
        self.stream_unimplemented = False

    def _enter(self, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.005)
        if self.abort is not None:
            context.abort(*self.abort)

    def Generate(self, request, context):
        self._enter(request, context)
        return lmserve_pb2.GenerateResponse(
            text=f"echo: {request.prompt}",
            token_ids=[11, 22, 33],
            prompt_tokens=len(request.prompt.split()),
            completion_tokens=3,
            finish_reason=(
                lmserve_pb2.FINISH_REASON_STOP if request.stop else lmserve_pb2.FINISH_REASON_LENGTH
            ),
            batch_size=4,
            queue_ms=1.5,
            compute_ms=12.25,
            cached_prompt_tokens=2 if request.cache_salt else 0,
        )

    def GenerateStream(self, request, context):
        if self.stream_unimplemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        self._enter(request, context)
        if self.hang_mid_stream:
            # The callback runs when the RPC ends. In this mode the stream would only end
            # after 5 s on its own, so an earlier end means the client cancelled. (The
            # generator itself may never resume after a cancel, so it cannot be the one
            # to notice.)
            context.add_callback(self.stream_cancelled.set)
        for i, (text, ids) in enumerate(STREAM_PIECES):
            last = i == len(STREAM_PIECES) - 1
            yield lmserve_pb2.GenerateStreamResponse(
                text=text,
                token_ids=ids,
                finish_reason=lmserve_pb2.FINISH_REASON_EOS if last else None,
            )
            if self.abort_mid_stream is not None:
                context.abort(*self.abort_mid_stream)
            if self.hang_mid_stream:
                deadline = time.monotonic() + 5
                while context.is_active() and time.monotonic() < deadline:
                    time.sleep(0.005)
                return

    def Tokenize(self, request, context):
        self._enter(request, context)
        return lmserve_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def GetModelInfo(self, request, context):
        self._enter(request, context)
        return MODEL_INFO


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture
def target(fake: FakeGenerator) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    lmserve_pb2_grpc.add_GeneratorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None).wait()


@pytest.fixture
def client(target: str) -> Iterator[Client]:
    with Client(target, timeout=5.0) as c:
        yield c


@pytest.fixture
async def aclient(target: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target, timeout=5.0) as c:
        yield c


@pytest.fixture
def dead_target() -> str:
    # A port nothing listens on: bind one, then free it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


EXPECTED_RESULT = GenerationResult(
    text="echo: the quick fox",
    token_ids=(11, 22, 33),
    prompt_tokens=3,
    completion_tokens=3,
    finish_reason=FinishReason.LENGTH,
    batch_size=4,
    queue_ms=1.5,
    compute_ms=12.25,
)

EXPECTED_CHUNKS = [
    StreamChunk("Hel", (10,), None),
    StreamChunk("lo", (11,), None),
    StreamChunk(" world", (12, 13), FinishReason.EOS),
]

EXPECTED_INFO = ModelInfo(
    model="sshleifer/tiny-gpt2",
    device="cpu",
    dtype="float32",
    max_context=1024,
    eos_token_id=50256,
    max_batch_size=8,
    max_wait_ms=5.0,
    max_new_tokens_cap=256,
    default_max_new_tokens=32,
)


def assert_no_optional_fields(request: lmserve_pb2.GenerateRequest) -> None:
    assert [f for f in OPTIONAL_FIELDS if request.HasField(f)] == []


def assert_explicit_fields(request: lmserve_pb2.GenerateRequest) -> None:
    """The request made with temperature=0.0, top_p=0.5, top_k=0, seed=0, stop=("\\n", "END")."""
    # Explicit zeros must be sent: "unset" and 0.0 are different requests.
    assert [f for f in OPTIONAL_FIELDS if request.HasField(f)] == list(OPTIONAL_FIELDS)
    assert request.temperature == 0.0
    assert request.top_p == 0.5
    assert request.top_k == 0
    assert request.seed == 0
    assert list(request.stop) == ["\n", "END"]


EXPLICIT = {"temperature": 0.0, "top_p": 0.5, "top_k": 0, "seed": 0, "stop": ("\n", "END")}


# --- types and errors without a server ---------------------------------------------------


def test_build_request_sets_only_given_fields() -> None:
    request = build_request("hi")
    assert request.prompt == "hi"
    assert request.max_new_tokens == 0
    assert list(request.stop) == []
    assert_no_optional_fields(request)
    assert_explicit_fields(build_request("hi", max_new_tokens=7, **EXPLICIT))  # type: ignore[arg-type]


def test_build_request_takes_a_bare_string_as_one_stop() -> None:
    assert list(build_request("hi", stop="\n\n").stop) == ["\n\n"]


def test_finish_reason_from_proto() -> None:
    assert FinishReason.from_proto(lmserve_pb2.FINISH_REASON_EOS) is FinishReason.EOS
    assert FinishReason.from_proto(lmserve_pb2.FINISH_REASON_STOP) is FinishReason.STOP
    assert FinishReason.from_proto(lmserve_pb2.FINISH_REASON_LENGTH) is FinishReason.LENGTH
    # A value from a newer server degrades instead of failing.
    assert FinishReason.from_proto(99) is FinishReason.UNSPECIFIED
    assert FinishReason.EOS == "eos"
    assert str(FinishReason.STOP) == "stop"


def test_error_classes_carry_their_code() -> None:
    for code, cls in CODE_CLASSES[:-1]:
        assert cls.code is code
        assert issubclass(cls, LmserveError)
    err = OverloadedError("queue full")
    assert (err.code, err.details, str(err)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queue full",
        "RESOURCE_EXHAUSTED: queue full",
    )


def test_from_rpc_error_without_a_code_is_unknown() -> None:
    err = from_rpc_error(grpc.RpcError("odd"))
    assert type(err) is LmserveError
    assert err.code is grpc.StatusCode.UNKNOWN
    assert err.details == "odd"


def test_version_and_exports() -> None:
    assert lmserve.__version__ == "0.1.0"
    assert {"Client", "AsyncClient", "OverloadedError", "FinishReason"} <= set(lmserve.__all__)


# --- Client ------------------------------------------------------------------------------


def test_generate_converts_the_response(client: Client, fake: FakeGenerator) -> None:
    result = client.generate("the quick fox", max_new_tokens=3)
    assert result == EXPECTED_RESULT
    assert isinstance(result.finish_reason, FinishReason)
    request = fake.requests[-1]
    assert (request.prompt, request.max_new_tokens) == ("the quick fox", 3)
    assert_no_optional_fields(request)


def test_generate_sends_explicit_fields(client: Client, fake: FakeGenerator) -> None:
    result = client.generate("x", **EXPLICIT)  # type: ignore[arg-type]
    assert result.finish_reason is FinishReason.STOP
    assert_explicit_fields(fake.requests[-1])


@pytest.mark.parametrize(("code", "cls"), CODE_CLASSES, ids=lambda v: getattr(v, "name", ""))
def test_status_codes_map_to_exceptions(
    client: Client, fake: FakeGenerator, code: grpc.StatusCode, cls: type[LmserveError]
) -> None:
    fake.abort = (code, f"details of {code.name}")
    with pytest.raises(LmserveError) as info:
        client.generate("x")
    assert type(info.value) is cls
    assert info.value.code is code
    assert info.value.details == f"details of {code.name}"
    # The grpc error stays reachable for debugging.
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_every_method_maps_errors(client: Client, fake: FakeGenerator) -> None:
    fake.abort = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    with pytest.raises(OverloadedError, match="queue full"):
        client.tokenize("x")
    with pytest.raises(OverloadedError, match="queue full"):
        client.model_info()
    with pytest.raises(OverloadedError, match="queue full"):
        list(client.stream("x"))


def test_timeout_per_call_and_client_default(target: str, fake: FakeGenerator) -> None:
    fake.delay_s = 2.0
    start = time.monotonic()
    with Client(target, timeout=5.0) as c, pytest.raises(DeadlineExceededError):
        c.generate("x", timeout=0.05)
    with Client(target, timeout=0.05) as c, pytest.raises(DeadlineExceededError):
        c.tokenize("x")
    assert time.monotonic() - start < 1.5


def test_tokenize_and_model_info(client: Client) -> None:
    assert client.tokenize("hé!") == [ord("h"), ord("é"), ord("!")]
    assert client.tokenize("") == []
    assert client.model_info() == EXPECTED_INFO


def test_stream_yields_chunks(client: Client, fake: FakeGenerator) -> None:
    assert list(client.stream("hi", max_new_tokens=4)) == EXPECTED_CHUNKS
    assert fake.requests[-1].max_new_tokens == 4
    assert_no_optional_fields(fake.requests[-1])
    list(client.stream("hi", **EXPLICIT))  # type: ignore[arg-type]
    assert_explicit_fields(fake.requests[-1])


def test_stream_error_after_first_chunk(client: Client, fake: FakeGenerator) -> None:
    fake.abort_mid_stream = (grpc.StatusCode.INTERNAL, "generate failed")
    chunks = client.stream("hi")
    assert next(chunks) == EXPECTED_CHUNKS[0]
    with pytest.raises(InternalError, match="generate failed"):
        next(chunks)


def test_closing_a_stream_early_cancels_the_call(client: Client, fake: FakeGenerator) -> None:
    fake.hang_mid_stream = True
    chunks = client.stream("hi")
    assert next(chunks) == EXPECTED_CHUNKS[0]
    chunks.close()  # type: ignore[attr-defined]
    assert fake.stream_cancelled.wait(2.0)


def test_metadata_and_options_pass_through(target: str, fake: FakeGenerator) -> None:
    with Client(target, metadata=[("x-api-key", "secret")]) as c:
        c.tokenize("a")
    assert fake.metadata[-1]["x-api-key"] == "secret"
    # A channel option the client must hand to grpc: a tiny receive limit fails the call.
    with (
        Client(target, options=[("grpc.max_receive_message_length", 4)]) as c,
        pytest.raises(OverloadedError),
    ):
        c.generate("a much longer answer than four bytes")


def test_wait_ready(client: Client, dead_target: str) -> None:
    client.wait_ready(2.0)
    with Client(dead_target) as c, pytest.raises(UnavailableError, match="not ready"):
        c.wait_ready(0.2)


def test_unreachable_server_is_unavailable(dead_target: str) -> None:
    with Client(dead_target, timeout=2.0) as c, pytest.raises(UnavailableError):
        c.generate("x")


# --- AsyncClient -------------------------------------------------------------------------


async def test_async_generate(aclient: AsyncClient, fake: FakeGenerator) -> None:
    assert await aclient.generate("the quick fox", max_new_tokens=3) == EXPECTED_RESULT
    assert_no_optional_fields(fake.requests[-1])
    result = await aclient.generate("x", **EXPLICIT)  # type: ignore[arg-type]
    assert result.finish_reason is FinishReason.STOP
    assert_explicit_fields(fake.requests[-1])


@pytest.mark.parametrize(("code", "cls"), CODE_CLASSES, ids=lambda v: getattr(v, "name", ""))
async def test_async_status_codes_map_to_exceptions(
    aclient: AsyncClient, fake: FakeGenerator, code: grpc.StatusCode, cls: type[LmserveError]
) -> None:
    fake.abort = (code, f"details of {code.name}")
    with pytest.raises(LmserveError) as info:
        await aclient.generate("x")
    assert type(info.value) is cls
    assert info.value.code is code
    assert info.value.details == f"details of {code.name}"


async def test_async_timeout(target: str, fake: FakeGenerator) -> None:
    fake.delay_s = 2.0
    async with AsyncClient(target, timeout=5.0) as c:
        with pytest.raises(DeadlineExceededError):
            await c.generate("x", timeout=0.05)
    async with AsyncClient(target, timeout=0.05) as c:
        with pytest.raises(DeadlineExceededError):
            await c.model_info()


async def test_async_tokenize_and_model_info(aclient: AsyncClient, fake: FakeGenerator) -> None:
    assert await aclient.tokenize("ab") == [97, 98]
    assert await aclient.model_info() == EXPECTED_INFO
    fake.abort = (grpc.StatusCode.NOT_FOUND, "no such model")
    with pytest.raises(NotFoundError, match="no such model"):
        await aclient.tokenize("ab")


async def test_async_stream(aclient: AsyncClient, fake: FakeGenerator) -> None:
    assert [c async for c in aclient.stream("hi", stop="\n")] == EXPECTED_CHUNKS
    assert list(fake.requests[-1].stop) == ["\n"]
    fake.abort_mid_stream = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    seen = []
    with pytest.raises(OverloadedError, match="queue full"):
        async for chunk in aclient.stream("hi"):
            seen.append(chunk)
    assert seen == EXPECTED_CHUNKS[:1]


async def test_async_metadata_and_wait_ready(
    target: str, fake: FakeGenerator, dead_target: str
) -> None:
    async with AsyncClient(target, metadata=[("x-api-key", "k")]) as c:
        await c.wait_ready(2.0)
        await c.tokenize("a")
    assert fake.metadata[-1]["x-api-key"] == "k"
    async with AsyncClient(dead_target) as c:
        with pytest.raises(UnavailableError, match="not ready"):
            await c.wait_ready(0.2)


# --- CLI ---------------------------------------------------------------------------------


def test_cli_generate_prints_text(
    target: str, fake: FakeGenerator, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "the quick fox", "--target", target, "--max-new-tokens", "5"]
    argv += ["--temperature", "0", "--stop", "\n", "--stop", "END"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("echo: the quick fox\n", "")
    request = fake.requests[-1]
    assert request.max_new_tokens == 5
    assert request.HasField("temperature") and request.temperature == 0.0
    assert not request.HasField("top_p")
    assert list(request.stop) == ["\n", "END"]


def test_cli_generate_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "the quick fox", "--json", "--target", target]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "text": "echo: the quick fox",
        "token_ids": [11, 22, 33],
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "finish_reason": "length",
        "batch_size": 4,
        "queue_ms": 1.5,
        "compute_ms": 12.25,
        "logprobs": [],
        "cached_prompt_tokens": 0,
    }


def test_cli_generate_sends_the_cache_salt_and_shows_the_cached_tokens(
    target: str, fake: FakeGenerator, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "the quick fox", "--json", "--target", target, "--cache-salt", "t1"]
    assert main(argv) == 0
    assert fake.requests[-1].cache_salt == "t1"
    assert json.loads(capsys.readouterr().out)["cached_prompt_tokens"] == 2
    assert main(["generate", "the quick fox", "--target", target]) == 0
    assert fake.requests[-1].cache_salt == ""


def test_cli_generate_stream(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--stream", "--target", target]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["generate", "hi", "--stream", "--json", "--target", target]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(EXPECTED_CHUNKS)
    assert lines[-1] == EXPECTED_CHUNKS[-1].to_dict()
    assert lines[-1]["finish_reason"] == "eos"
    # How a request was served is known only at its end: chunks before the last leave the
    # usage out rather than say "prompt_tokens": 0, "batch_size": 0.
    usage = {
        "prompt_tokens",
        "completion_tokens",
        "batch_size",
        "queue_ms",
        "compute_ms",
        "cached_prompt_tokens",
    }
    for line, chunk in zip(lines[:-1], EXPECTED_CHUNKS[:-1], strict=True):
        assert line == {k: v for k, v in chunk.to_dict().items() if k not in usage}
        assert line["finish_reason"] is None and not usage & line.keys()


def test_cli_stream_falls_back_to_unary(
    target: str, fake: FakeGenerator, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.stream_unimplemented = True
    assert main(["generate", "hi", "--stream", "--target", target]) == 0
    out, err = capsys.readouterr()
    assert out == "echo: hi\n"
    assert "does not implement streaming" in err
    # With --json the one chunk carries the whole result's usage, cached tokens included.
    argv = ["generate", "hi", "--stream", "--json", "--cache-salt", "t", "--target", target]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {
        "text": "echo: hi",
        "token_ids": [11, 22, 33],
        "finish_reason": "length",
        "logprobs": [],
        "prompt_tokens": 1,
        "completion_tokens": 3,
        "batch_size": 4,
        "queue_ms": 1.5,
        "compute_ms": 12.25,
        "cached_prompt_tokens": 2,
    }


def test_cli_tokenize_and_info(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "ab c", "--target", target]) == 0
    assert capsys.readouterr().out == "97 98 32 99\n"
    assert main(["tokenize", "ab", "--json", "--target", target]) == 0
    assert json.loads(capsys.readouterr().out) == [97, 98]
    assert main(["info", "--json", "--target", target]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED_INFO.to_dict()
    assert main(["info", "--target", target]) == 0
    out = capsys.readouterr().out
    assert "model                   sshleifer/tiny-gpt2\n" in out
    assert "max_batch_size          8\n" in out


def test_cli_target_and_timeout_from_env(
    target: str,
    fake: FakeGenerator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LMSERVE_TARGET", target)
    monkeypatch.setenv("LMSERVE_TIMEOUT", "0.05")
    assert main(["tokenize", "a"]) == 0
    assert capsys.readouterr().out == "97\n"
    fake.delay_s = 2.0
    assert main(["tokenize", "a"]) == 1
    assert capsys.readouterr().err.startswith("error: DEADLINE_EXCEEDED: ")


def test_cli_error_is_one_clean_line(
    target: str, fake: FakeGenerator, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.abort = (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be at most 256")
    assert main(["generate", "x", "--max-new-tokens", "999", "--target", target]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: INVALID_ARGUMENT: max_new_tokens must be at most 256\n"


def test_cli_ctrl_c_exits_130(
    target: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "generate", interrupted)
    assert main(["generate", "x", "--target", target]) == 130
    assert capsys.readouterr() == ("", "")


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("generate", "tokenize", "info"))
    with pytest.raises(SystemExit) as info:
        main(["generate", "x", "--timeout", "soon"])
    assert info.value.code == 2
    assert "--timeout: not a number of seconds" in capsys.readouterr().err
