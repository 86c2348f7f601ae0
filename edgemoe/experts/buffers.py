"""Read buffers: where requested byte ranges land (alignment widening), a pool of page-aligned buffers
allocated with `mmap`, and the per-caller `Buffer` lease that hides the widening.

O_DIRECT needs the file offset, the length and the memory address of every read aligned to the
device's logical block size; 4096 covers every common device, and anonymous `mmap` memory is
page-aligned by construction.
"""

from __future__ import annotations

import mmap
import threading
from typing import NamedTuple

import numpy as np

ALIGN = 4096  # bytes; O_DIRECT alignment of offsets, lengths and buffer addresses


def widen(offset: int, length: int, align: int = ALIGN) -> tuple[int, int]:
    """(start, stop) of the smallest `align`-aligned extent covering [offset, offset + length)."""
    start = offset - offset % align
    stop = -(-(offset + length) // align) * align
    return start, stop


class Read(NamedTuple):
    """One `preadv`: `nbytes` from `file_offset` into the buffer at `buf_pos`; the first `need` bytes must exist."""

    file_offset: int
    buf_pos: int
    nbytes: int
    need: int


class Layout(NamedTuple):
    """How requested ranges are read into one buffer."""

    reads: tuple[Read, ...]  # one per requested range, in request order
    segments: tuple[tuple[int, int], ...]  # (buf_pos, length) of each requested range's bytes
    nbytes: int  # buffer bytes needed (a multiple of `align`)
    requested: int  # sum of requested lengths


def plan(ranges: tuple[tuple[int, int], ...], align: int) -> Layout:
    """Lay `ranges` ((offset, length), ...) out back to back, each widened to `align` (1 = not widened)."""
    reads, segments, pos = [], [], 0
    for offset, length in ranges:
        start, stop = widen(offset, length, align)
        reads.append(Read(start, pos, stop - start, offset + length - start))
        segments.append((pos + offset - start, length))
        pos += stop - start
    return Layout(tuple(reads), tuple(segments), pos, sum(length for _, length in ranges))


class Slot:
    """One buffer's memory. A pooled slot returns to its pool when the last lease on it is released."""

    __slots__ = ("array", "pool", "refs", "grown")
    _refs_lock = threading.Lock()

    def __init__(self, array: np.ndarray, pool: BufferPool | None, grown: bool = False):
        self.array = array  # (capacity,) uint8
        self.pool = pool
        self.refs = 0
        self.grown = grown  # allocated beyond the pool's fixed buffers

    def unref(self) -> None:
        with Slot._refs_lock:
            self.refs -= 1
            last = self.refs == 0
        if last and self.pool is not None:
            self.pool.give_back(self)


def scratch_slot(nbytes: int, aligned: bool) -> Slot:
    """A one-off buffer outside the pool: page-aligned `mmap` memory for O_DIRECT, else plain numpy memory."""
    if aligned:
        return Slot(np.frombuffer(mmap.mmap(-1, max(nbytes, ALIGN)), dtype=np.uint8), None)
    return Slot(np.empty(max(nbytes, 1), dtype=np.uint8), None)


class BufferPool:
    """`fixed` page-aligned buffers of `buffer_bytes` in one `mmap`, growing one `mmap` at a time to `maximum`.

    Grown buffers stay in the pool (peak memory is `maximum * buffer_bytes`) until `trim()`.
    Anonymous mappings cost no RAM until first written.
    """

    def __init__(self, buffer_bytes: int, fixed: int, maximum: int):
        self.buffer_bytes = buffer_bytes
        self.fixed = fixed
        self.maximum = maximum
        self._lock = threading.Lock()
        self._free: list[Slot] = []
        if fixed:
            base = np.frombuffer(mmap.mmap(-1, buffer_bytes * fixed), dtype=np.uint8)  # (fixed * buffer_bytes,)
            self._free = [Slot(base[i * buffer_bytes : (i + 1) * buffer_bytes], self) for i in range(fixed)]
        self.allocated = fixed
        self.grows = 0

    def acquire(self) -> Slot | None:
        """A free buffer, growing the pool if it is below `maximum`; None when exhausted."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self.allocated >= self.maximum:
                return None
            self.allocated += 1
            self.grows += 1
        return Slot(np.frombuffer(mmap.mmap(-1, self.buffer_bytes), dtype=np.uint8), self, grown=True)

    def give_back(self, slot: Slot) -> None:
        slot.refs = 0
        with self._lock:
            self._free.append(slot)

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    def trim(self) -> int:
        """Drop free grown buffers (their memory goes once no view of them is alive); returns how many."""
        with self._lock:
            dropped = sum(s.grown for s in self._free)
            self._free = [s for s in self._free if not s.grown]
            self.allocated -= dropped
        return dropped


class Buffer:
    """One caller's lease on a completed read: the requested bytes, ranges concatenated in order.

    Offsets given to `view` count in that concatenation, so the alignment widening is invisible.
    Callers sharing a merged read share the memory; it returns to the pool when the last lease is
    released. Views must not be used after `release()` (the memory is reused by later reads).
    """

    def __init__(self, key, slot: Slot, segments: tuple[tuple[int, int], ...]):
        self.key = key
        self._slot = slot
        self._segments = segments  # (buf_pos, length) per requested range
        self.nbytes = sum(length for _, length in segments)
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    def view(self, offset: int = 0, length: int | None = None) -> np.ndarray:
        """(length,) read-only uint8 view of bytes [offset, offset + length) of the concatenated ranges.

        Zero-copy when the span lies inside one requested range (always true for an expert's gate/up/down);
        a span across ranges that are not adjacent in memory comes back as a copy.
        """
        if self._released:
            raise ValueError(f"buffer of {self.key!r} was released")
        if length is None:
            length = self.nbytes - offset
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise ValueError(f"view [{offset}, {offset + length}) outside the {self.nbytes} bytes read for {self.key!r}")
        spans, need = [], length  # (start, stop) positions in the buffer
        for pos, seg_len in self._segments:
            if need == 0:
                break
            if offset >= seg_len:
                offset -= seg_len
                continue
            take = min(seg_len - offset, need)
            if spans and spans[-1][1] == pos + offset:  # adjacent in memory (unwidened reads): extend
                spans[-1] = (spans[-1][0], pos + offset + take)
            else:
                spans.append((pos + offset, pos + offset + take))
            need -= take
            offset = 0
        arr = self._slot.array
        if len(spans) > 1:
            return np.concatenate([arr[a:b] for a, b in spans])
        out = arr[spans[0][0] : spans[0][1]] if spans else arr[:0]
        out.flags.writeable = False  # only this slice; shared by merged callers, so nobody may write it
        return out

    def copy(self, out: np.ndarray | None = None) -> np.ndarray:
        """The requested bytes concatenated into a new (nbytes,) uint8 array (or into `out`)."""
        if self._released:
            raise ValueError(f"buffer of {self.key!r} was released")
        if out is None:
            out = np.empty(self.nbytes, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.shape != (self.nbytes,):
            raise ValueError(f"out must be a ({self.nbytes},) uint8 array, got {out.dtype} {out.shape}")
        at = 0
        for pos, length in self._segments:
            out[at : at + length] = self._slot.array[pos : pos + length]
            at += length
        return out

    def release(self) -> None:
        """Give the lease back (idempotent)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._slot.unref()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
