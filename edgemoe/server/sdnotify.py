"""systemd's sd_notify protocol in a few lines of stdlib: one datagram per state change."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send e.g. "READY=1" or "STATUS=loading" to $NOTIFY_SOCKET; False when not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            # Never block the caller (the event loop) on a full receive queue; a lost ping is retried anyway.
            s.send(state.encode(), socket.MSG_DONTWAIT)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


def listen_fds() -> list[int]:
    """File descriptors systemd passed by socket activation (starting at 3), [] when none are ours."""
    n = os.environ.get("LISTEN_FDS")
    pid = os.environ.get("LISTEN_PID")
    if not n or not n.isdigit() or int(n) < 1:
        return []
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return []
    for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)  # not inherited by children
    return list(range(3, 3 + int(n)))
