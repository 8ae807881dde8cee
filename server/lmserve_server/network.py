"""Where the daemon listens: a check that its ports are free, made before the model loads,
and whether an address reaches beyond this machine.

gRPC would say nothing useful itself: it sets SO_REUSEPORT by default (so a second daemon on
a taken port shares it with the first, silently), and without it a failed bind is reported
only after the model has loaded, as a bare "Failed to bind".
"""

from __future__ import annotations

import errno
import ipaddress
import socket


def _unbracketed(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC parses it: an IPv6 address in brackets (``[::]:50051``; gRPC
    reads ``:::50051`` as a misformatted domain name)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(_unbracketed(host)).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int, flag: str, host_flag: str = "--host") -> None:
    """Raises OSError naming the flags and the address when ``host:port`` can't be listened
    on: another program holds it, ``host`` does not resolve, or it is not an address of this
    machine.

    Binds each address ``host`` resolves to, with SO_REUSEADDR as gRPC and the metrics
    server do, so a port left in TIME_WAIT passes and a listening one does not. With port 0
    (any free port) only the address is checked.
    """
    try:
        addresses = socket.getaddrinfo(
            _unbracketed(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise OSError(f"{host_flag} {host}: cannot resolve it ({err.strerror})") from None
    failures: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE and port != 0:
                    raise OSError(
                        f"{flag} {port}: {grpc_address(host, port)} is already in use "
                        "(another lmserve, or another program, listens there)"
                    ) from None
                failures.append(err)
    # Like gRPC, serve when at least one address works (localhost without IPv6, say).
    if failures and len(failures) == len(addresses):
        first = failures[0]
        reason = (
            "it is not an address of this machine"
            if first.errno == errno.EADDRNOTAVAIL
            else first.strerror or str(first)
        )
        raise OSError(
            f"{host_flag} {host} {flag} {port}: cannot listen on {grpc_address(host, port)}: "
            f"{reason}"
        )
