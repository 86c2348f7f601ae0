"""What one client may cost the server: body size, JSON shape, time to send a request, open connections.

One place for every bound of the HTTP side, so the systemd unit's LimitNOFILE= and the connection cap
can be checked against each other (tests/test_server_abuse.py does).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

log = logging.getLogger("edgemoe.server")

MAX_BODY_BYTES = 8 << 20  # far beyond any context's worth of text or token ids
MAX_JSON_DEPTH = 64  # a request is 3 levels deep ({"messages": [{...}]}); more is an attack, not a request
MAX_INT_DIGITS = 20  # every integer field fits in 64 bits; Python's int() refuses > 4300 digits with ValueError
MAX_CONNECTIONS = 256  # open connections; max_batch + max_queue (72 by default) plus pollers and idle keep-alives
BACKLOG = 128  # connections the kernel holds before accept(); beyond it clients get ECONNREFUSED/EAGAIN
READ_TIMEOUT_S = 15.0  # seconds to send a request's headers, and again its body (slowloris)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
# File descriptors besides connections and the backlog: listening sockets, model and expert files (buffered +
# O_DIRECT), epoll, the notify socket, Numba's cache files. The server uses ~10-30; the rest is headroom.
NOFILE_RESERVE = 128


@dataclass(frozen=True)
class HttpLimits:
    """The bounds one server runs with (defaults above; `edgemoe serve` flags override some)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    max_int_digits: int = MAX_INT_DIGITS
    max_connections: int = MAX_CONNECTIONS
    backlog: int = BACKLOG
    read_timeout_s: float = READ_TIMEOUT_S
    keep_alive_s: int = KEEP_ALIVE_S


def fit_to_nofile(limits: HttpLimits, reserve: int = NOFILE_RESERVE) -> HttpLimits:
    """Make room under RLIMIT_NOFILE for `max_connections` + `backlog` (asyncio accepts up to `backlog` sockets
    in one go, before any refused one is closed): raise the soft limit up to the hard one, and if that is still
    short, lower both (one log line), so accept() never fails with EMFILE ("too many open files")."""
    import resource

    need = limits.max_connections + limits.backlog + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return limits
    room = max(soft - reserve, soft // 2)  # a small limit still leaves half of it to clients
    cap, backlog = min(limits.max_connections, max(1, room * 3 // 4)), min(limits.backlog, max(1, room // 4))
    log.warning("the open-file limit is %d (systemd: LimitNOFILE=); accepting at most %d connections instead of %d",
                soft, cap, limits.max_connections)
    return dataclasses.replace(limits, max_connections=cap, backlog=backlog)
