"""uvicorn's h11 protocol with the two guards it lacks: a cap on open connections, enforced when a connection is
accepted (uvicorn's limit_concurrency only answers 503 once a whole request has arrived, so idle connections
pile up until the process runs out of file descriptors), and a deadline for a request's headers (uvicorn has
none: a client that sends nothing, or one header line a minute, holds its connection for ever). The body's
deadline is the app's (body.read_body), which answers 408.
"""

from __future__ import annotations

import http
import json

from .limits import HttpLimits
from .noise import Throttle
from .schemas import RequestError


def raw_response(status: int, message: str) -> bytes:
    """A whole JSON error response that closes the connection, written before h11 has seen any request."""
    body = json.dumps(RequestError(message, None, status).body()).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_h11(limits: HttpLimits, noise: Throttle) -> type:
    """The protocol class to pass as uvicorn.Config(http=...)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._deadline = None  # asyncio.TimerHandle: closes the connection unless a request arrives by then
            self._waiting_after = None  # the request cycle that was current when the deadline was set

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                noise.note("connections refused", "refused a connection: %d are open, the cap is %d",
                           len(self.connections) - 1, limits.max_connections, burst=1)
                transport.write(raw_response(503, f"the server has {limits.max_connections} connections open, its "
                                                  "limit; retry in a moment"))
                transport.close()
                return
            self._expect_request()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_after:  # a request's headers are in
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is done:  # no pipelined request started meanwhile
                self._expect_request()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

        def _expect_request(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._waiting_after = self.cycle
            self._deadline = self.loop.call_later(limits.read_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.cycle is not self._waiting_after:
                return
            noise.note("slow requests", "closed a connection that sent no whole request headers in %g s",
                       limits.read_timeout_s, burst=1)
            if self.cycle is None or self.cycle.response_complete:  # nothing of ours is in flight on it
                self.transport.write(raw_response(408, f"no whole request arrived within {limits.read_timeout_s:g} "
                                                       "s; send the request at once"))
            self.transport.close()

    return GuardedH11Protocol
