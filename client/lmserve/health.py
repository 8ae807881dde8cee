"""``grpc.health.v1`` for the thin client: ask a daemon whether it is SERVING, or wait until
it is (``lmserve-client --wait``, ``lmserve-client health``, a container's HEALTHCHECK).

The daemon binds its port only once the model is loaded and warmed up, and reports
``SERVING`` from then until it drains; before that a connection is refused. Waiting therefore
polls ``Check`` until it answers SERVING, whatever failed meanwhile.

The two health messages are built here from their descriptor, in a private pool, rather
than imported from grpcio-health-checking: that package is a dependency of the daemon, and
the client needs grpcio and protobuf only. The wire format is the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# SERVICE: the service whose status means "the model is loaded and can take calls" (the
# daemon also reports the server as a whole under "").
from lmserve.balancing import SERVICE
from lmserve.errors import UnavailableError, from_rpc_error

__all__ = [
    "SERVICE",
    "SERVING",
    "check",
    "check_async",
    "wait_until_serving",
    "wait_until_serving_async",
]

SERVING = "SERVING"
CHECK_METHOD = "/grpc.health.v1.Health/Check"
# Between two checks while waiting: short next to a model's load, long enough not to spin.
POLL_INTERVAL_S = 0.25
# A check that gets no answer is given up after this, so a wait can try again.
CHECK_TIMEOUT_S = 5.0
# Channel arguments for waiting: gRPC backs off up to 120 s between connection attempts,
# which would notice a daemon that came up long after it did; retry at least every second.
WAIT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _health_messages() -> tuple[Any, Any, dict[int, str]]:
    """HealthCheckRequest, HealthCheckResponse and the ServingStatus names by number, as in
    grpc/health/v1/health.proto."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    statuses = {0: "UNKNOWN", 1: SERVING, 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
    enum = response.enum_type.add(name="ServingStatus")
    for number, name in statuses.items():
        enum.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()  # private: no clash with grpcio-health-checking
    pool.Add(proto)
    request_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
    )
    response_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    )
    return request_class, response_class, statuses


HealthCheckRequest, HealthCheckResponse, STATUS_NAMES = _health_messages()


def _check_method(channel: grpc.Channel | grpc.aio.Channel) -> Callable[..., Any]:
    return channel.unary_unary(
        CHECK_METHOD,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )


def _status_name(reply: Any) -> str:
    return STATUS_NAMES.get(reply.status, f"status {reply.status}")


def check(
    channel: grpc.Channel,
    service: str = SERVICE,
    *,
    timeout: float | None = CHECK_TIMEOUT_S,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> str:
    """The health status of ``service`` as its name (``"SERVING"``, ``"NOT_SERVING"``, ...).

    Raises ``grpc.RpcError`` when the check itself fails: ``UNAVAILABLE`` (nobody listens,
    or the daemon is draining), ``NOT_FOUND`` (a server that does not know ``service``),
    ``UNIMPLEMENTED`` (a server without the health service).
    """
    request = HealthCheckRequest(service=service)
    return _status_name(_check_method(channel)(request, timeout=timeout, metadata=metadata))


async def check_async(
    channel: grpc.aio.Channel,
    service: str = SERVICE,
    *,
    timeout: float | None = CHECK_TIMEOUT_S,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> str:
    """``check`` on an asyncio channel."""
    request = HealthCheckRequest(service=service)
    return _status_name(await _check_method(channel)(request, timeout=timeout, metadata=metadata))


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Wait:
    """One wait for SERVING: its deadline, and what the last check saw (for the error)."""

    def __init__(self, timeout: float, service: str, target: str) -> None:
        self.timeout, self.service, self.target = timeout, service, target
        self.deadline = time.monotonic() + timeout
        self.last = "no check finished"

    def check_timeout(self) -> float:
        """How long the next check may take; ``UnavailableError`` when the time is up."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise UnavailableError(
                f"{self.target or 'the daemon'} not {SERVING} for "
                f"{self.service or 'the server'} after {self.timeout:g}s (last check: {self.last})"
            )
        return min(remaining, CHECK_TIMEOUT_S)

    def served(self, outcome: str | grpc.RpcError) -> bool:
        """Whether a check's status (or its error) ends the wait. A server without the
        health service (``UNIMPLEMENTED``) counts as serving once it answers, as gRPC's own
        client-side health checking treats it."""
        if isinstance(outcome, str):
            self.last = outcome
            return outcome == SERVING
        error = from_rpc_error(outcome)
        self.last = _one_line(str(error))
        return error.code is grpc.StatusCode.UNIMPLEMENTED

    def pause(self, poll_interval: float) -> float:
        return max(0.0, min(poll_interval, self.deadline - time.monotonic()))


def wait_until_serving(
    channel: grpc.Channel,
    timeout: float,
    *,
    service: str = SERVICE,
    target: str = "",
    metadata: Sequence[tuple[str, str]] | None = None,
    poll_interval: float = POLL_INTERVAL_S,
) -> None:
    """Returns once ``service`` is SERVING; ``UnavailableError`` after ``timeout`` seconds,
    saying what the last check saw. Give ``channel`` the options ``WAIT_CHANNEL_OPTIONS``
    so a daemon that starts late is noticed promptly."""
    wait = _Wait(timeout, service, target)
    while True:
        outcome: str | grpc.RpcError
        try:
            outcome = check(channel, service, timeout=wait.check_timeout(), metadata=metadata)
        except grpc.RpcError as err:
            outcome = err
        if wait.served(outcome):
            return
        time.sleep(wait.pause(poll_interval))


async def wait_until_serving_async(
    channel: grpc.aio.Channel,
    timeout: float,
    *,
    service: str = SERVICE,
    target: str = "",
    metadata: Sequence[tuple[str, str]] | None = None,
    poll_interval: float = POLL_INTERVAL_S,
) -> None:
    """``wait_until_serving`` on an asyncio channel."""
    wait = _Wait(timeout, service, target)
    while True:
        outcome: str | grpc.RpcError
        try:
            outcome = await check_async(
                channel, service, timeout=wait.check_timeout(), metadata=metadata
            )
        except grpc.RpcError as err:
            outcome = err
        if wait.served(outcome):
            return
        await asyncio.sleep(wait.pause(poll_interval))
