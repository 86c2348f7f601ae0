"""Logging of what clients can cause at will: hang-ups, timeouts, refused connections, accept() failing with
"too many open files". Each event is one short line, never a traceback, and a flood is cut to `burst` lines
per kind and interval plus one count, so an attacker cannot fill the disk or the journal with the log.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable


class Throttle:
    """At most `burst` lines per key every `interval_s`; the rest are counted and reported in one line."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.burst, self.interval_s, self.clock = logger, burst, interval_s, clock
        self._windows: dict[str, list] = {}  # key → [window start, lines logged, events suppressed]

    def admit(self, key: str, burst: int | None = None) -> bool:
        """True: log this event of kind `key`; False: it was counted instead. `burst` overrides the default."""
        burst = self.burst if burst is None else burst
        now = self.clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval_s:
            if w is not None and w[2]:
                self.log.warning("%s: %d more in the last %.0f s (not logged one by one)", key, w[2],
                                 now - w[0])
            w = self._windows[key] = [now, 0, 0]
        if w[1] < burst:
            w[1] += 1
            if w[1] == burst > 1:
                self.log.warning("%s: %d in %.0f s; more in the next %.0f s are only counted", key, burst,
                                 now - w[0], self.interval_s - (now - w[0]))
            return True
        w[2] += 1
        return False

    def note(self, key: str, msg: str, *args, level: int = logging.INFO, burst: int | None = None) -> None:
        """Log `msg % args` as one line unless events of kind `key` are flooding."""
        if self.admit(key, burst):
            self.log.log(level, msg, *args)


class QuietFilter(logging.Filter):
    """For uvicorn's own logger: each message kind passes through the throttle; only its first record keeps a
    traceback (a bug should be seen once), later ones are cut to one line."""

    def __init__(self, throttle: Throttle):
        super().__init__()
        self.throttle = throttle
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"uvicorn: {record.msg}".strip()
        if not self.throttle.admit(key):
            return False
        if record.exc_info and key in self._seen:
            exc = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__}: {exc})", None
            record.exc_info = record.exc_text = None
        self._seen.add(key)
        return True


def loop_exception_handler(throttle: Throttle, logger: logging.Logger):
    """An asyncio exception handler: an OSError (accept() at the open-file limit: EMFILE, a reset socket) is one
    short line; any other exception shows its traceback the first time only."""
    seen: set[str] = set()

    def handle(loop, context: dict) -> None:
        message = context.get("message") or "error in the event loop"
        exc = context.get("exception")
        if isinstance(exc, OSError):
            hint = "; raise LimitNOFILE= or lower --max-connections" if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
            # burst=1: accept() at the limit fails again every second (asyncio retries it) until connections close
            throttle.note(message, "%s: %s%s", message, exc.strerror or exc, hint, level=logging.WARNING, burst=1)
            return
        key = f"{message}: {type(exc).__name__}"
        if not throttle.admit(key):
            return
        if exc is not None and key not in seen:
            seen.add(key)
            logger.error("%s", message, exc_info=exc)
        else:
            logger.error("%s%s", message, f": {type(exc).__name__}: {exc}" if exc is not None else "")

    return handle
