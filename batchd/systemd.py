"""sd_notify(3) without libsystemd: readiness, status text, stopping, and watchdog pings for ``Type=notify``.

Every function returns False, and does nothing, when not run by systemd (no ``$NOTIFY_SOCKET``), so the
daemon calls them unconditionally. The watchdog protocol: when the unit sets ``WatchdogSec=``, systemd
passes ``WATCHDOG_USEC``; the daemon sends :func:`watchdog` at half :func:`watchdog_interval`, and only while
``Health.all_alive()``, so a stuck loop gets the service restarted.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_interval"]

# A datagram to a local socket does not normally block; bound it anyway so a wedged systemd cannot hang us.
_SEND_TIMEOUT = 1.0


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (e.g. vsock:)


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to systemd. True if it was sent."""
    address = _address()
    family = getattr(socket, "AF_UNIX", None)
    if address is None or family is None:
        return False
    try:
        with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def ready() -> bool:
    """Startup is finished: systemd marks the unit active (``Type=notify``)."""
    return notify("READY=1")


def stopping() -> bool:
    """Shutdown has begun."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """One watchdog keep-alive ping."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form status shown by ``systemctl status`` (one line)."""
    # A newline would end the STATUS= assignment and start a bogus one.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects a ping; None if the watchdog is off or meant for another pid."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    # systemd sets WATCHDOG_PID to the main pid; a child that inherited the environment must not ping.
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    return usec / 1_000_000
