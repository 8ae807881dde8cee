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

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# SERVICE: the service whose status means "the model is loaded and can take calls" (the
# daemon also reports the server as a whole under "").
from lmserve.balancing import SERVICE
from lmserve.errors import UnavailableError, from_rpc_error

__all__ = ["SERVICE", "SERVING", "check", "wait_until_serving"]

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
    call: Callable[..., Any] = channel.unary_unary(
        CHECK_METHOD,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    reply = call(HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
    return STATUS_NAMES.get(reply.status, f"status {reply.status}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
    saying what the last check saw.

    A server without the health service (``UNIMPLEMENTED``) counts as serving once it
    answers, as gRPC's own client-side health checking treats it. Give ``channel`` the
    options ``WAIT_CHANNEL_OPTIONS`` so a daemon that starts late is noticed promptly.
    """
    deadline = time.monotonic() + timeout
    last = "no check finished"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            where = target or "the daemon"
            raise UnavailableError(
                f"{where} not {SERVING} for {service or 'the server'} after {timeout:g}s "
                f"(last check: {last})"
            )
        try:
            status = check(
                channel, service, timeout=min(remaining, CHECK_TIMEOUT_S), metadata=metadata
            )
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if error.code is grpc.StatusCode.UNIMPLEMENTED:
                return
            last = _one_line(str(error))
        else:
            if status == SERVING:
                return
            last = status
        time.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))
