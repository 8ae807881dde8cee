"""Random requests at a real daemon: every reply is OK or a clean INVALID_ARGUMENT naming
a field, and the daemon stays SERVING throughout.

The draws reach every limit of a request: ``max_new_tokens`` below, within and above the
server's cap of 1024, and prompts of up to 1100 tokens, around the model's 1024-token
context, alone or together with ``max_new_tokens``. Most draws are refused at once, and
even a valid request for 1024 new tokens takes only about two seconds on the tiny model.
``test_the_draws_reach_every_limit`` checks that the strategy does reach those regions;
``--hypothesis-show-statistics`` shows the mix of outcomes.
"""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, find, given, settings
from hypothesis import strategies as st

import lmserve
from lmserve.bench_workload import prompt_of_length
from lmserve.cli import main as client_main
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from tests.conftest import RunningDaemon
from tests.ops_support import free_port, scrape

FIELDS = ("prompt", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "context")
CONTEXT = 1024  # the tiny GPT-2's n_positions
CAP = 1024  # the daemon's --max-new-tokens-cap
DEFAULT_MAX_NEW_TOKENS = 64  # what max_new_tokens 0 means

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1e-30, 0.5, 1.0, 1.5, -0.0, -1.0, 3.4e38]),
)
requests = st.builds(
    lambda prompt, n, t, p, k, seed, stop, has: lmserve_pb2.GenerateRequest(
        prompt=prompt,
        max_new_tokens=n,
        stop=stop,
        **{
            name: value
            for name, value, present in (
                ("temperature", t, has[0]),
                ("top_p", p, has[1]),
                ("top_k", k, has[2]),
                ("seed", seed, has[3]),
            )
            if present
        },
    ),
    st.one_of(
        st.text(max_size=60),
        # Exactly N tokens (one GPT-2 token a word): from well inside the context to past it.
        st.builds(prompt_of_length, st.integers(CONTEXT - 80, CONTEXT + 76)),
    ),
    # 0 (the default) and small counts, any count up to the cap, and counts over it.
    st.one_of(
        st.integers(0, 6),
        st.integers(7, CAP),
        st.sampled_from([CAP - 1, CAP, CAP + 1]),
        st.integers(CAP + 1, 2**64 - 1),
    ),
    floats,
    floats,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.text(max_size=300), max_size=20),
    st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
)


@pytest.mark.parametrize(
    "reaches",
    [
        pytest.param(lambda r: 7 <= r.max_new_tokens < CAP, id="max_new_tokens within the cap"),
        pytest.param(lambda r: r.max_new_tokens == CAP, id="max_new_tokens at the cap"),
        pytest.param(lambda r: len(r.prompt.split()) > CONTEXT, id="a prompt over the context"),
        pytest.param(
            lambda r: CONTEXT - 64 < len(r.prompt.split()) <= CONTEXT and r.max_new_tokens == 0,
            id="a prompt that the default max_new_tokens takes over the context",
        ),
    ],
)
def test_the_draws_reach_every_limit(reaches) -> None:  # type: ignore[no-untyped-def]
    # Generation only: one example is proof enough, shrinking it would only cost time.
    find(
        requests,
        reaches,
        settings=settings(max_examples=2000, database=None, phases=[Phase.generate]),
    )


@pytest.fixture(scope="module")
def stubs(daemon: RunningDaemon):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(daemon.address) as channel:
        yield lmserve_pb2_grpc.GeneratorStub(channel), health_pb2_grpc.HealthStub(channel)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests)
def test_random_requests_get_ok_or_invalid_argument(stubs, request) -> None:  # type: ignore[no-untyped-def]
    generator, health = stubs
    try:
        reply = generator.Generate(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        named = [field for field in FIELDS if field in err.details()]
        assert named, err.details()
        event(f"INVALID_ARGUMENT: {named[-1]}")  # --hypothesis-show-statistics shows the mix
    else:
        asked = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        assert reply.completion_tokens == len(reply.token_ids)
        assert reply.completion_tokens <= asked <= CAP
        # Accepted only when it fits the context, and never by cutting the prompt.
        assert reply.prompt_tokens + asked <= CONTEXT
        tokens = generator.Tokenize(lmserve_pb2.TokenizeRequest(text=request.prompt), timeout=30)
        assert reply.prompt_tokens == len(tokens.token_ids)
        event(f"OK, max_new_tokens {'<= 6' if asked <= 6 else '7-1024'}")
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


MALFORMED = b"\xff\xff\xff"  # no protobuf message parses from these bytes


def send_raw(channel: grpc.Channel, method: str, payload: bytes, **kwargs: object) -> None:
    """Calls ``method`` with ``payload`` as the request's bytes, past any stub's serializer."""
    path = f"/lmserve.v1.Generator/{method}"
    if method == "GenerateStream":
        list(channel.unary_stream(path)(payload, timeout=30, **kwargs))
    else:
        channel.unary_unary(path)(payload, timeout=30, **kwargs)


def raw_status(channel: grpc.Channel, method: str, payload: bytes, **kwargs: object):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        send_raw(channel, method, payload, **kwargs)
    return err.value.code(), err.value.details()  # type: ignore[attr-defined]


def test_a_malformed_message_is_invalid_argument_counted_and_logged_once(
    make_daemon,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    running = make_daemon(metrics_port=port)
    methods = ("Generate", "GenerateStream", "Tokenize")
    with grpc.insecure_channel(running.address) as channel:
        for _ in range(5):
            for method in methods:
                code, details = raw_status(channel, method, MALFORMED)
                assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
                assert details.startswith("malformed request: ")
    # The interceptor records a call once it has ended, maybe just after the client has it.
    m = scrape(port)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        m.get(("lmserve_requests_total", (("code", "INVALID_ARGUMENT"), ("method", name)))) != 5
        for name in methods
    ):
        time.sleep(0.05)
        m = scrape(port)
    for method in methods:
        assert (
            m[("lmserve_requests_total", (("code", "INVALID_ARGUMENT"), ("method", method)))] == 5
        )
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) <= 1, [r.getMessage() for r in noisy]
    assert all("Traceback" not in r.getMessage() and r.exc_info is None for r in noisy)


def test_a_malformed_message_without_the_token_is_unauthenticated(make_daemon) -> None:  # type: ignore[no-untyped-def]
    running = make_daemon(auth_token="t0k")
    with grpc.insecure_channel(running.address) as channel:
        for method in ("Generate", "GenerateStream", "Tokenize"):
            code, _ = raw_status(channel, method, MALFORMED)
            assert code is grpc.StatusCode.UNAUTHENTICATED
            with_token = {"metadata": [("authorization", "Bearer t0k")]}
            code, _ = raw_status(channel, method, MALFORMED, **with_token)
            assert code is grpc.StatusCode.INVALID_ARGUMENT


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_max_new_tokens_beyond_32_bits_is_refused_not_wrapped(daemon: RunningDaemon) -> None:
    """2^40 + 5 on the wire (field 2, a varint, as any sender may write it) is the server's
    real value, refused with the cap, and not read back as 5."""
    asked = 2**40 + 5
    payload = b"\x0a\x05Hello" + b"\x10" + varint(asked)  # prompt="Hello", max_new_tokens
    with grpc.insecure_channel(daemon.address) as channel:
        code, details = raw_status(channel, "Generate", payload)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details == (
            f"max_new_tokens: {asked} exceeds the server's cap of 1024 (--max-new-tokens-cap)"
        )
        code, _ = raw_status(channel, "GenerateStream", payload)
        assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_over_the_size_limit_is_too_large_not_an_overload(
    make_daemon, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Over --max-message-bytes gRPC itself answers RESOURCE_EXHAUSTED, the code of an
    overload; raised as OverloadedError ("back off and retry") it would invite a retry that
    can never succeed. The status stays gRPC's (server and client agree on it); the client
    says what it is."""
    running: RunningDaemon = make_daemon(max_message_bytes=65536)
    prompt = "x" * 100_000
    with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as raw:
        lmserve_pb2_grpc.GeneratorStub(channel).Generate(
            lmserve_pb2.GenerateRequest(prompt=prompt), timeout=30
        )
    assert raw.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # the server's status
    with lmserve.Client(running.address, timeout=30) as client:
        for call in (client.generate, lambda p: list(client.stream(p)), client.tokenize):
            with pytest.raises(lmserve.RequestTooLargeError) as err:
                call(prompt)
            assert not isinstance(err.value, lmserve.OverloadedError)
            assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.retryable is False
            assert (err.value.size, err.value.limit) == (100_004, 65536)
            assert "request too large: 100004 bytes" in str(err.value)
            assert "--max-message-bytes) of 65536 bytes" in str(err.value)
        assert client.generate("x" * 1000, max_new_tokens=1).completion_tokens == 1
    async with lmserve.AsyncClient(running.address, timeout=30) as aclient:
        with pytest.raises(lmserve.RequestTooLargeError):
            await aclient.generate(prompt)
    code = client_main(["generate", prompt, "--target", running.address, "--timeout", "30"])
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 1 and "request too large" in line and "65536" in line, line
    assert lmserve.OverloadedError("queue is full").retryable is True
