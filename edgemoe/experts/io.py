"""Expert reads from disk: worker threads issue `os.preadv` on an O_DIRECT file descriptor into
page-aligned pool buffers. Demand reads overtake queued prefetches; reads of a key already in flight
are merged; a thermal governor can lower the queue depth and pace reads.

    reader = ExpertReader(path, buffer_bytes=max_expert_bytes)
    handle = reader.read((layer, e), extent.ranges, priority=DEMAND, checksum=crc_hex)
    buf = handle.result(timeout=30)              # Buffer: the requested bytes, ranges concatenated
    gate = buf.view(part_offset, part_length)    # (part_length,) uint8, zero-copy
    buf.release()                                # back to the pool once every merged caller released

A read that fails (EIO, a short read, a checksum mismatch) is tried again, up to `ATTEMPTS` times in all,
before its callers get the error: a transient fault costs milliseconds, not requests.

`preadv` releases the GIL, so plain threads overlap disk reads with compute.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import threading
import time
import warnings
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait

import numpy as np

from ..errors import EdgeMoEError, ModelFormatError, UsageError
from ..pack.checksum import ALGORITHMS, update
from .buffers import ALIGN, Buffer, BufferPool, Layout, Slot, plan, scratch_slot
from .io_stats import ReaderStats
from .read_jobs import (
    DEMAND,
    DONE,
    PREFETCH,
    QUEUED,
    RUNNING,
    ChecksumError,
    ExpertIOError,
    ReadHandle,
    ReadJob,
    after_attempts,
    parse_checksum,
)

# An O_DIRECT read of at least two of these goes out as concurrent aligned pieces of about this size:
# one expert then keeps several requests in flight (a virtual disk reads 0.6 GB/s with one 4 MB
# request at a time, and more with several).
PIECE_BYTES = 2 << 20
_PIECE_THREADS = 4  # per reader, shared by its workers

# A prefetch never takes the disk from a demand read: at most this share of the queue depth runs prefetches
# (so a worker is always free for a demand), a prefetch reads its pieces one at a time, and before each it
# waits while a demand read is running.
PREFETCH_SHARE = 0.5
PREFETCH_PIECE_BYTES = 512 << 10  # a prefetch's pieces: a demand waits for at most one of these

# A failed read is tried this many times in all, waiting BACKOFF_S, then twice, four times as long in
# between (5 + 10 + 20 = 35 ms): enough to ride out a transient fault (a controller reset, a bit flipped in
# transit), short enough that a persistent one fails its requests quickly.
ATTEMPTS = 4
BACKOFF_S = 0.005

_NO_DIRECT_ERRNOS = (errno.EINVAL, errno.EOPNOTSUPP)


class ExpertReader:
    """Reads experts' byte ranges from one file with a pool of `queue_depth` worker threads.

    direct_io:     open with O_DIRECT (no page cache); EINVAL/EOPNOTSUPP from open or read falls back to
                   buffered reads with one warning and `stats.direct_io = False`.
    fixed_buffers: page-aligned pool buffers of `buffer_bytes` (rounded up to 4096) allocated up front;
                   the pool grows to `max_buffers`, then reads degrade to buffered reads into ordinary
                   memory (`stats.degraded_reads`). A read larger than `buffer_bytes` gets a one-off buffer.
    verify:        check the CRC passed as `checksum=` to `read()` (one pass over the bytes, on the worker),
                   computed with `checksum_algorithm` ("crc32c", or "crc32" for a format 1 pack's manifest).
    A failed read is tried ATTEMPTS times in all before its handles raise; `stats` (ReaderStats) counts the
    retries, the reads they saved (`recovered_reads`) and the reads that failed anyway (`errors`).
    """

    def __init__(self, path, *, direct_io: bool = True, queue_depth: int = 4, fixed_buffers: int = 8,
                 max_buffers: int = 32, buffer_bytes: int, verify: bool = False,
                 checksum_algorithm: str = "crc32c"):  # fmt: skip
        if queue_depth < 1 or fixed_buffers < 0 or max_buffers < max(fixed_buffers, 1) or buffer_bytes < 1:
            raise UsageError(
                f"bad reader settings: queue_depth={queue_depth} (>= 1), fixed_buffers={fixed_buffers} (>= 0), "
                f"max_buffers={max_buffers} (>= fixed_buffers, >= 1), buffer_bytes={buffer_bytes} (>= 1)"
            )
        if checksum_algorithm not in ALGORITHMS:
            raise UsageError(f"unknown checksum algorithm {checksum_algorithm!r}; known: {', '.join(ALGORITHMS)}")
        self.path = os.fspath(path)
        self.verify = verify
        self.checksum_algorithm = checksum_algorithm
        self.stats = ReaderStats(direct_io=False, queue_depth=queue_depth)
        try:
            self._fd_buffered = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ModelFormatError(f"cannot open {self.path}: {e.strerror}; check the path and its permissions") from e
        self._fd_direct = -1
        self._warned = False
        self._cond = threading.Condition()
        if direct_io:
            try:
                self._fd_direct = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
                self.stats.direct_io = True
            except (OSError, AttributeError) as e:  # AttributeError: no os.O_DIRECT on this platform
                if isinstance(e, OSError) and e.errno not in _NO_DIRECT_ERRNOS:
                    os.close(self._fd_buffered)
                    raise ModelFormatError(f"cannot open {self.path}: {e.strerror}; check the path") from e
                self._disable_direct(e)
        self._pool = BufferPool(-(-buffer_bytes // ALIGN) * ALIGN, fixed_buffers, max_buffers)
        self.stats.pool_buffers = self._pool.allocated
        self._heap: list[tuple[int, int, ReadJob]] = []  # (priority, seq, job); stale entries skipped
        self._inflight: dict[object, ReadJob] = {}  # key -> queued or running job
        self._seq = itertools.count()
        self._depth = queue_depth
        self._running = 0
        self._running_demand = 0  # running reads that started as demands
        self._running_prefetch = 0
        self._busy_since = 0.0
        self._pacing = 0.0
        self._last_start = -float("inf")
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._piece_pool: ThreadPoolExecutor | None = None  # started with the first split read
        self._spawn(queue_depth)

    # -- public API ------------------------------------------------------------------------------------

    def read(self, key, ranges, *, priority: int = DEMAND, checksum: str | None = None) -> ReadHandle:
        """Queue a read of `ranges` ((offset, length), ...) under `key`; returns a `ReadHandle`.

        A read of `key` already queued or running is joined instead (same buffer); a read of a higher priority
        (lower number) joining a queued one promotes it. `checksum`: the CRC (`checksum_algorithm`) of the
        concatenated requested bytes as a hex string.
        """
        ranges = tuple((int(o), int(n)) for o, n in ranges)
        if not ranges or any(o < 0 or n <= 0 for o, n in ranges):
            raise ValueError(f"read of {key!r}: ranges must be non-empty (offset >= 0, length > 0), got {ranges}")
        if not isinstance(priority, int) or priority < DEMAND:
            raise ValueError(f"priority must be DEMAND ({DEMAND}) or PREFETCH ({PREFETCH}) + k, got {priority!r}")
        crc = parse_checksum(key, checksum)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"ExpertReader({self.path}) is closed")
            self.stats.requests += 1
            job = self._inflight.get(key)
            if job is not None:
                if job.ranges != ranges:
                    raise ValueError(f"read of {key!r} in flight with ranges {job.ranges}, asked again with {ranges}")
                self.stats.merged_reads += 1
                if job.crc is None:
                    job.crc = crc
                if priority < job.priority:
                    job.priority = priority
                    self._cond.notify_all()  # a running prefetch waiting to yield reads on as a demand
                    if job.state == QUEUED:  # re-queued among demands in the order they were asked for
                        job.seq = next(self._seq)
                        heapq.heappush(self._heap, (priority, job.seq, job))
                        self.stats.promoted += 1
                        self._cond.notify_all()
            else:
                job = ReadJob(key, ranges, priority, next(self._seq), crc)
                self._inflight[key] = job
                heapq.heappush(self._heap, (priority, job.seq, job))
                self.stats.queued += 1
                self._cond.notify_all()
            handle = ReadHandle(self, job)
            job.handles.append(handle)
        return handle

    def cancel_prefetches(self, keys=None) -> int:
        """Drop queued PREFETCH reads (all, or those whose key is in `keys`); their handles raise
        `CancelledError`. Running reads finish. Returns how many were dropped."""
        keys = None if keys is None else set(keys)
        with self._cond:
            victims = [
                j for j in self._inflight.values()
                if j.state == QUEUED and j.priority >= PREFETCH and (keys is None or j.key in keys)
            ]  # fmt: skip
            self._cancel(victims, "prefetch cancelled")
        for job in victims:
            job.done.set()
        return len(victims)

    def set_queue_depth(self, n: int) -> None:
        """Allow `n` (>= 1) reads at once. Lowering it lets running reads finish; nothing queued is lost."""
        if int(n) != n or n < 1:
            raise UsageError(f"queue depth must be an integer >= 1, got {n!r}")
        with self._cond:
            self._depth = self.stats.queue_depth = int(n)
            self._spawn(int(n))
            self._cond.notify_all()

    def set_pacing(self, seconds: float) -> None:
        """Start at most one read every `seconds` (0 = unpaced). Queued reads wait; none is dropped."""
        if not 0 <= seconds < float("inf"):
            raise UsageError(f"pacing must be a finite number of seconds >= 0, got {seconds!r}")
        with self._cond:
            self._pacing = self.stats.pacing_s = float(seconds)
            self._cond.notify_all()

    def pool_free(self) -> int:
        """Pool buffers not leased to anyone."""
        return self._pool.free

    def close(self) -> None:
        """Cancel queued reads (`CancelledError`), let running ones finish, join the workers, close the file."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            victims = [j for j in self._inflight.values() if j.state == QUEUED]
            self._cancel(victims, "reader closed")
            self._cond.notify_all()
        for job in victims:
            job.done.set()
        for t in self._threads:
            t.join()
        if self._piece_pool is not None:
            self._piece_pool.shutdown(wait=True)
        for fd in (self._fd_direct, self._fd_buffered):
            if fd >= 0:
                os.close(fd)
        self._fd_direct = self._fd_buffered = -1

    def __enter__(self) -> ExpertReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers ---------------------------------------------------------------------------------------

    def _spawn(self, n: int) -> None:
        # Threads beyond the current depth stay parked; the depth gate in _next_job is what limits reads.
        while len(self._threads) < n:
            t = threading.Thread(target=self._worker, name=f"edgemoe-io-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def _cancel(self, jobs: list[ReadJob], why: str) -> None:
        for job in jobs:  # caller holds the lock and sets job.done after releasing it
            job.state = DONE
            job.error = CancelledError(f"read of {job.key!r} from {self.path}: {why}")
            del self._inflight[job.key]
            self.stats.queued -= 1
            self.stats.cancelled += 1

    def _next_job(self) -> ReadJob | None:
        """Block until a read may start (depth and pacing allow it); None once closed. Holds the lock."""
        while not self._closed:
            while self._heap and not _current(self._heap[0]):
                heapq.heappop(self._heap)  # stale: cancelled, or superseded by a promoted entry
            if not self._heap or self._running >= self._depth or (
                    self._heap[0][0] >= PREFETCH and self._running_prefetch >= self._prefetch_limit()):
                self._cond.wait()
                continue
            now = time.perf_counter()
            wait = self._last_start + self._pacing - now
            if wait > 0:
                self._cond.wait(wait)  # re-checked: pacing may change, a demand may arrive
                continue
            job = heapq.heappop(self._heap)[2]
            job.state = RUNNING
            job.lane = DEMAND if job.priority == DEMAND else PREFETCH
            if job.lane == DEMAND:
                self._running_demand += 1
            else:
                self._running_prefetch += 1
            self._last_start = now
            self.stats.queued -= 1
            if self._running == 0:
                self._busy_since = now
            self._running += 1
            return job
        return None

    def _prefetch_limit(self) -> int:
        return max(1, int(self._depth * PREFETCH_SHARE))

    def _yield_to_demand(self, job: ReadJob) -> None:
        """Before a prefetch's next piece: wait while a demand read runs (not once it is demanded itself)."""
        if job.lane == DEMAND:
            return
        with self._cond:
            while self._running_demand > 0 and job.priority != DEMAND and not self._closed:
                self._cond.wait()

    def _worker(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
            if job is None:
                return
            self._finish(job, *self._attempt(job))

    def _attempt(self, job: ReadJob) -> tuple[Slot | None, Layout | None, float, bool]:
        """Read and check `job`'s bytes, again after a failure (up to ATTEMPTS in all, backing off);
        (slot, layout, seconds to data in RAM, degraded), or (None, None, seconds, False) with job.error set."""
        t0 = time.perf_counter()
        for attempt in itertools.count(1):
            slot = None
            try:
                slot, layout, degraded = self._fill(job)
                elapsed = time.perf_counter() - t0
                if self.verify and job.crc is not None:
                    self._check(job, slot, layout)
                if attempt > 1:
                    with self._cond:
                        self.stats.recovered_reads += 1
                return slot, layout, elapsed, degraded
            except Exception as e:  # every failure reaches the waiting callers; a worker never dies
                if slot is not None and slot.pool is not None:
                    slot.pool.give_back(slot)
                if not isinstance(e, EdgeMoEError):
                    e = ExpertIOError(f"reading {job.key!r} from {self.path} failed: {e!r}")
                if attempt == ATTEMPTS or self._closed:
                    job.error = e if attempt == 1 else after_attempts(e, attempt)
                    return None, None, time.perf_counter() - t0, False
                with self._cond:
                    self.stats.retries += 1
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))

    def _fill(self, job: ReadJob) -> tuple[Slot, Layout, bool]:
        """Read `job`'s ranges into a buffer: pool (O_DIRECT when available), one-off, or degraded."""
        while True:
            direct = self._fd_direct >= 0 and self.stats.direct_io
            layout = plan(job.ranges, ALIGN if direct else 1)
            degraded = False
            if layout.nbytes > self._pool.buffer_bytes:
                slot = scratch_slot(layout.nbytes, aligned=direct)
            else:
                slot = self._pool.acquire()
                if slot is None:  # pool exhausted: buffered read into ordinary memory rather than wait
                    degraded, direct = True, False
                    layout = plan(job.ranges, 1)
                    slot = scratch_slot(layout.nbytes, aligned=False)
            try:
                self._read_into(job, slot.array, layout, self._fd_direct if direct else self._fd_buffered, direct)
                return slot, layout, degraded
            except BaseException as e:
                if slot.pool is not None:
                    slot.pool.give_back(slot)
                if direct and isinstance(e, OSError) and e.errno in _NO_DIRECT_ERRNOS:
                    self._disable_direct(e)
                    continue  # retry buffered
                raise

    def _read_into(self, job: ReadJob, array: np.ndarray, layout: Layout, fd: int, direct: bool) -> None:
        for r in layout.reads:
            dest = array[r.buf_pos : r.buf_pos + r.nbytes]  # (nbytes,) uint8
            n_pieces = r.nbytes // PIECE_BYTES if direct else 1
            if job.lane == DEMAND:
                got = self._read_pieces(job, fd, dest, r.file_offset, direct, n_pieces)
            else:  # a prefetch: one piece at a time, each after the running demands, the rest at once if demanded
                step = -(-PREFETCH_PIECE_BYTES // ALIGN) * ALIGN
                got = 0
                for a in range(0, r.nbytes, step):
                    self._yield_to_demand(job)
                    if job.priority == DEMAND:
                        got += self._read_pieces(job, fd, dest[a:], r.file_offset + a, direct,
                                                 (r.nbytes - a) // PIECE_BYTES if direct else 1)
                        break
                    g = self._read_span(job, fd, dest[a:min(a + step, r.nbytes)], r.file_offset + a, direct)
                    got += g
                    if g < min(step, r.nbytes - a):
                        break  # end of file
            if got < r.need:
                raise ModelFormatError(
                    f"{self.path} is truncated: expert {job.key!r} needs bytes up to {r.file_offset + r.need} but "
                    f"the file ends at {r.file_offset + got}; re-download the model or re-run `edgemoe partition`"
                )
            with self._cond:
                self.stats.bytes_read += got

    def _read_pieces(self, job: ReadJob, fd: int, dest: np.ndarray, offset: int, direct: bool, n_pieces: int) -> int:
        """Read dest's bytes at file `offset` as `n_pieces` concurrent aligned pieces (one read when < 2);
        the bytes read up to the first short piece (end of file)."""
        if n_pieces < 2:
            return self._read_span(job, fd, dest, offset, direct)
        step = -(-dest.nbytes // n_pieces // ALIGN) * ALIGN
        spans = [(a, min(a + step, dest.nbytes)) for a in range(0, dest.nbytes, step)]
        with self._cond:
            if self._piece_pool is None:
                self._piece_pool = ThreadPoolExecutor(_PIECE_THREADS, thread_name_prefix="edgemoe-io-piece")
            pool = self._piece_pool
        rest = [pool.submit(self._read_span, job, fd, dest[a:b], offset + a, direct) for a, b in spans[1:]]
        try:
            gots = [self._read_span(job, fd, dest[: spans[0][1]], offset, direct)]
        finally:
            wait(rest)  # no piece may still write into the buffer once this returns or raises
        gots += [f.result() for f in rest]
        got = 0
        for (a, b), g in zip(spans, gots):
            got += g
            if g < b - a:
                break
        return got

    def _read_span(self, job: ReadJob, fd: int, dest: np.ndarray, offset: int, direct: bool) -> int:
        """Read up to len(dest) bytes at file `offset` into `dest`; the count (short only at end of file)."""
        got = 0
        while got < dest.nbytes:
            try:
                n = os.preadv(fd, [dest[got:]], offset + got)
            except OSError as e:
                if direct and e.errno in _NO_DIRECT_ERRNOS:
                    raise
                raise ExpertIOError(
                    f"reading expert {job.key!r} from {self.path} failed at byte {offset + got}: "
                    f"{e.strerror or e} (errno {e.errno}); the disk or the file is damaged: check `dmesg` / "
                    "`smartctl`, then re-download the model or re-run `edgemoe partition`"
                ) from e
            if n == 0:
                break  # EOF
            got += n
            if direct and got % ALIGN:
                break  # O_DIRECT stops short only at EOF, and an unaligned retry would EINVAL
        return got

    def _check(self, job: ReadJob, slot: Slot, layout: Layout) -> None:
        crc = 0
        for pos, length in layout.segments:
            crc = update(self.checksum_algorithm, crc, slot.array[pos : pos + length])  # releases the GIL
        if crc != job.crc:
            raise ChecksumError(
                f"checksum mismatch for expert {job.key!r} in {self.path}: expected {job.crc:08x}, read {crc:08x}; "
                "the file is corrupt: re-run `edgemoe partition` or re-download the model"
            )

    def _finish(self, job: ReadJob, slot: Slot | None, layout: Layout | None, elapsed: float, degraded: bool) -> None:
        with self._cond:
            now = time.perf_counter()
            self._running -= 1
            if job.lane == DEMAND:
                self._running_demand -= 1
            else:
                self._running_prefetch -= 1
            if self._running == 0:
                self.stats.busy_s += now - self._busy_since
            job.state = DONE
            del self._inflight[job.key]
            st = self.stats
            st.latencies_ms.append(elapsed * 1e3)
            st.pool_buffers = self._pool.allocated
            if job.error is not None:
                st.errors += 1
                st.last_error = str(job.error)
            else:
                st.reads += 1
                st.bytes_requested += layout.requested
                st.degraded_reads += degraded
                st.oversize_reads += slot.pool is None and not degraded
                holders = [h for h in job.handles if not h._abandoned]
                slot.refs = len(holders)
                for h in holders:
                    h._buffer = Buffer(job.key, slot, layout.segments)
                if not holders and slot.pool is not None:
                    slot.pool.give_back(slot)
            self._cond.notify_all()  # a depth slot is free
        job.done.set()

    def _disable_direct(self, err: BaseException) -> None:
        """Switch to buffered reads; warns exactly once per reader."""
        with self._cond:
            self.stats.direct_io = False
            if self._warned:
                return
            self._warned = True
        warnings.warn(
            f"O_DIRECT reads are not supported for {self.path} ({err}); falling back to buffered reads through "
            "the page cache. Put the model on a filesystem with O_DIRECT (ext4, xfs) or set direct_io to false.",
            RuntimeWarning,
            stacklevel=3,
        )


def _current(entry: tuple[int, int, ReadJob]) -> bool:
    priority, seq, job = entry
    return job.state == QUEUED and priority == job.priority and seq == job.seq
