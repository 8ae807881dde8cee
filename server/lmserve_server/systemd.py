"""systemd's notify protocol without a dependency: READY=1, STOPPING=1 and WATCHDOG=1.

``notify(state)`` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and does nothing when it is unset, so the daemon behaves the same
outside systemd. ``watchdog_interval()`` is half of ``$WATCHDOG_USEC`` when systemd asks
this process for keep-alives; ``ping_watchdog`` sends them from the event loop, so a
stalled loop stops them and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]  # the abstract namespace
    if address.startswith("/"):
        return address
    return None  # unset, or a kind this module does not speak (vsock)


def notify(state: str) -> bool:
    """Sends ``state`` (e.g. ``"READY=1"``) to systemd; False when there is no one to tell."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as err:
        log.warning("could not notify systemd (%s): %s", state.split("\n", 1)[0], err)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half the watchdog timeout), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if _address() is None or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):  # meant for another process
        return None
    return int(usec) / 2_000_000


async def ping_watchdog(interval: float) -> None:
    """Sends WATCHDOG=1 every ``interval`` seconds until cancelled."""
    log.info("systemd watchdog: a keep-alive every %.3g s", interval)
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
