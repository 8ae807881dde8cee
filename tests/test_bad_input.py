"""Random requests at a real daemon: every reply is OK or a clean INVALID_ARGUMENT naming
a field, and the daemon stays SERVING throughout."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from tests.conftest import RunningDaemon

FIELDS = ("prompt", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "context")

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
    st.text(max_size=60),
    # Small valid counts, or counts over the cap: a valid 800-token request is no bad input
    # and would only make the test slow.
    st.one_of(st.integers(0, 6), st.integers(1025, 2**32 - 1)),
    floats,
    floats,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.text(max_size=300), max_size=20),
    st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
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
        assert any(field in err.details() for field in FIELDS), err.details()
    else:
        assert reply.completion_tokens == len(reply.token_ids)
        assert reply.completion_tokens <= (request.max_new_tokens or 64)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
