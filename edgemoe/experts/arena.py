"""The expert cache's memory: one anonymous mmap carved by a best-fit free list (experts/cache.py owns it)."""

from __future__ import annotations

import bisect
import mmap

import numpy as np


class Arena:
    """One anonymous mmap carved by a best-fit free list kept sorted by offset (coalesced on free)."""

    def __init__(self, size: int):
        self.size = size
        self._mm = mmap.mmap(-1, size) if size else None  # pages are committed only when written
        self._mv = memoryview(self._mm) if size else None
        self._free_off: list[int] = [0] if size else []  # sorted
        self._free_len: list[int] = [size] if size else []

    def alloc(self, n: int) -> int | None:
        best = -1
        for i, length in enumerate(self._free_len):
            if length >= n and (best < 0 or length < self._free_len[best]):
                best = i
                if length == n:
                    break
        if best < 0:
            return None
        off = self._free_off[best]
        if self._free_len[best] == n:
            del self._free_off[best], self._free_len[best]
        else:
            self._free_off[best] += n
            self._free_len[best] -= n
        return off

    def free(self, off: int, n: int) -> None:
        i = bisect.bisect(self._free_off, off)
        if i > 0 and self._free_off[i - 1] + self._free_len[i - 1] == off:  # merge with the hole before
            i -= 1
            self._free_len[i] += n
        else:
            self._free_off.insert(i, off)
            self._free_len.insert(i, n)
        if i + 1 < len(self._free_off) and self._free_off[i] + self._free_len[i] == self._free_off[i + 1]:
            self._free_len[i] += self._free_len.pop(i + 1)
            del self._free_off[i + 1]

    def view(self, off: int, n: int) -> np.ndarray:
        return np.frombuffer(self._mv[off : off + n], np.uint8)  # (n,) writable
