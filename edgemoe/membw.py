"""This machine's memory read bandwidth, measured the way the kernels read weights: a parallel stream."""

from __future__ import annotations

import statistics
import time

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _read_all(a):
    """Sum of a large float32 array: a pure streaming read.  a: (N,)"""
    total = np.float32(0.0)
    for i in prange(a.size):
        total += a[i]
    return total


def memory_read_gbs(mb: int = 512, repeat: int = 7) -> float:
    """Median GB/s (1e9 bytes) of parallel streaming reads over an `mb`-MB buffer, after a warm-up read."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)  # (N,)
    _read_all(a)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        _read_all(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times) / 1e9
