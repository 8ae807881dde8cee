"""Spreading calls over several lmserve replicas with gRPC's own machinery, no proxy.

The channel's service config asks for the ``round_robin`` policy over every address the
target resolves to (several ``ipv4:``/``ipv6:`` addresses, or a DNS name such as a Kubernetes
headless Service), for client-side health checking (``healthCheckConfig``: a replica whose
``grpc.health.v1`` status for ``lmserve.v1.Generator`` is not SERVING, i.e. still loading
or draining, gets no new calls), and for a retry policy on UNAVAILABLE: generation has no
side effects, so a call that failed to reach a model may safely go to another replica.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

SERVICE = "lmserve.v1.Generator"


def service_config(*, retries: int = 5) -> dict[str, Any]:
    """round_robin + client-side health checking + retries of UNAVAILABLE."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    if retries > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": retries,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def resolve_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one address, a DNS name, or several ``ip:port`` addresses.

    ``["127.0.0.1:50051", "127.0.0.1:50052"]`` becomes ``ipv4:127.0.0.1:50051,127.0.0.1:50052``;
    several host names can't share one target: give a DNS name that resolves to all of
    them instead (``dns:///lmserve.default.svc:50051``).
    """
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("no address given")
    if len(addresses) == 1:
        return addresses[0]
    families = {_ip_family(a) for a in addresses}
    if None in families or len(families) != 1:
        raise ValueError(
            f"several addresses must all be IPv4 or all IPv6 ip:port pairs, got {addresses}; "
            "for host names use one DNS name that resolves to every replica (dns:///name:port)"
        )
    return f"{families.pop()}:{','.join(addresses)}"


def _ip_family(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return "ipv4" if ip.version == 4 else "ipv6"


def channel_options(
    options: Sequence[tuple[str, Any]], *, balance: bool, retries: int
) -> list[tuple[str, Any]]:
    """The caller's channel options, plus the balancing service config unless they set one."""
    result = list(options)
    if balance and not any(name == "grpc.service_config" for name, _ in result):
        result.append(("grpc.service_config", json.dumps(service_config(retries=retries))))
    return result
