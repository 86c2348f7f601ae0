"""What a read of `ExpertReader` (`io`) is made of: its priorities, the job shared by every caller of one key, the
handle each caller waits on, and the errors a read ends in."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..errors import EdgeMoEError, UsageError
from .buffers import Buffer

if TYPE_CHECKING:
    from .io import ExpertReader

DEMAND = 0  # a layer is waiting for this expert
PREFETCH = 1  # a prediction; yields to every demand read. PREFETCH + k: a prediction k layers further ahead,
# which also yields to every nearer one

QUEUED, RUNNING, DONE = range(3)


class ExpertIOError(EdgeMoEError):
    """Reading an expert's bytes failed (EIO and friends); the message names the key, file and offset."""


class ChecksumError(EdgeMoEError):
    """An expert's bytes do not match the crc32 recorded in the pack manifest."""


class ReadJob:
    """One disk read of one key, shared by every handle that asked for it while it was in flight."""

    __slots__ = ("key", "ranges", "priority", "seq", "crc", "state", "handles", "error", "done", "lane")

    def __init__(self, key, ranges, priority, seq, crc):
        self.key, self.ranges, self.priority, self.seq, self.crc = key, ranges, priority, seq, crc
        self.state = QUEUED
        self.lane = DEMAND  # the kind of read it started as (counted in _running_demand or _running_prefetch)
        self.handles: list[ReadHandle] = []
        self.error: BaseException | None = None
        self.done = threading.Event()


class ReadHandle:
    """A future for one `read()` call. Each handle holds one lease on the shared buffer."""

    def __init__(self, reader: ExpertReader, job: ReadJob):
        self._reader = reader
        self._job = job
        self.key = job.key
        self._buffer: Buffer | None = None  # set by the worker when the read completes
        self._abandoned = False

    def done(self) -> bool:
        return self._job.done.is_set()

    def result(self, timeout: float | None = None) -> Buffer:
        """Wait for the read; returns this caller's `Buffer`. Raises `TimeoutError`, `CancelledError`
        (prefetch cancelled or reader closed), `ExpertIOError`, `ChecksumError` or `ModelFormatError`."""
        if not self._job.done.wait(timeout):
            raise TimeoutError(f"read of {self.key!r} did not complete within {timeout} s")
        if self._job.error is not None:
            raise self._job.error
        if self._buffer is None:
            raise ValueError(f"handle of {self.key!r} was released before its read completed")
        return self._buffer

    def failed(self) -> bool:
        """The read has ended in an error (every attempt failed, or it was cancelled)."""
        return self._job.done.is_set() and self._job.error is not None

    def release(self) -> None:
        """Give up this caller's lease, whether or not the read has completed (idempotent)."""
        with self._reader._cond:  # the worker hands out leases under this lock when it marks the job done
            if self._job.state != DONE:
                self._abandoned = True  # the worker will not give this handle a lease
                return
        if self._buffer is not None:
            self._buffer.release()


def after_attempts(e: EdgeMoEError, attempts: int) -> EdgeMoEError:
    """`e` (the last attempt's error), its message saying it was no transient fault."""
    try:
        out = type(e)(f"after {attempts} attempts: {e}")
    except TypeError:  # a subclass with another constructor: its own message will do
        return e
    out.__cause__ = e
    return out


def parse_checksum(key, checksum: str | None) -> int | None:
    if checksum is None:
        return None
    try:
        value = int(checksum, 16)
    except (TypeError, ValueError):
        value = -1
    if not 0 <= value <= 0xFFFFFFFF:
        raise UsageError(f"checksum of {key!r} must be a crc32 hex string like '1a2b3c4d', got {checksum!r}")
    return value
