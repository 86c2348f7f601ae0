"""Counters of an expert reader (`io.ExpertReader.stats`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReaderStats:
    """Counters of one `ExpertReader` (updated live; `as_dict()` for a snapshot)."""

    direct_io: bool = True  # False once O_DIRECT was refused (or never asked for)
    queue_depth: int = 0  # worker reads allowed at once
    pacing_s: float = 0.0  # minimum seconds between read starts (thermal governor)
    requests: int = 0  # read() calls
    reads: int = 0  # reads completed from disk (a merged read counts once)
    merged_reads: int = 0  # read() calls that joined a read already in flight
    promoted: int = 0  # queued prefetches demanded before they started
    cancelled: int = 0  # queued reads dropped (cancel_prefetches, close)
    degraded_reads: int = 0  # pool exhausted: buffered read into ordinary memory
    oversize_reads: int = 0  # larger than buffer_bytes: a one-off buffer
    errors: int = 0  # reads that failed every attempt (I/O, truncation, checksum)
    retries: int = 0  # attempts repeated after a failed one (EIO, short read, checksum mismatch)
    recovered_reads: int = 0  # reads that succeeded after at least one retry: a fault no caller saw
    last_error: str = ""  # the message of the last read that failed every attempt
    bytes_read: int = 0  # bytes transferred from the file, alignment widening included
    bytes_requested: int = 0
    busy_s: float = 0.0  # wall time with at least one read in progress
    queued: int = 0  # reads waiting for a worker now
    pool_buffers: int = 0  # pool buffers allocated now
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=4096))  # per read, start to data in RAM

    def _percentile(self, q: float) -> float:
        return float(np.percentile(np.fromiter(self.latencies_ms, float), q)) if self.latencies_ms else 0.0

    @property
    def p50_ms(self) -> float:
        return self._percentile(50)

    @property
    def p99_ms(self) -> float:
        return self._percentile(99)

    @property
    def gbps(self) -> float:
        """Achieved read bandwidth: bytes read / busy wall time, in GB/s (1e9 bytes)."""
        return self.bytes_read / self.busy_s / 1e9 if self.busy_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "latencies_ms"}
        d.update(p50_ms=self.p50_ms, p99_ms=self.p99_ms, gbps=self.gbps)
        return d
