"""ExpertReader: bytes match plain `open().read()`, merging, priority, pool degradation, O_DIRECT fallback,
checksums (against zlib.crc32 and crc32c) and error propagation. Every wait has a timeout, so a bug fails instead of hanging."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
import time
import warnings
import zlib
from concurrent.futures import CancelledError

import crc32c
import numpy as np
import pytest

import edgemoe.experts.io as io_mod
from edgemoe.errors import EdgeMoEError, ModelFormatError, UsageError
from edgemoe.experts.io import ExpertReader
from edgemoe.experts.read_jobs import DEMAND, PREFETCH, ChecksumError, ExpertIOError

T = 10  # seconds: the longest any wait may take before the test fails
SIZE = 3 * 65536 + 1234  # deliberately not a multiple of 4096


@pytest.fixture
def datafile(tmp_path):
    path = tmp_path / "experts.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    return path


def expected(path, ranges) -> bytes:
    out = b""
    with open(path, "rb") as f:
        for off, n in ranges:
            f.seek(off)
            out += f.read(n)
    return out


def direct_fd(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class Gate:
    """Replaces os.preadv: records each call's file offset and holds calls until `open()`."""

    def __init__(self, monkeypatch, fail=None):
        self.real = os.preadv
        self.offsets: list[int] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        self.fail = fail  # fd, offset -> OSError | None
        monkeypatch.setattr(os, "preadv", self._preadv)

    def open(self):
        self._open.set()

    def _preadv(self, fd, buffers, offset, *args):
        self.offsets.append(offset)
        self.entered.set()
        if not self._open.wait(T):
            raise OSError(errno.ETIMEDOUT, "test gate never opened")
        err = self.fail(fd, offset) if self.fail else None
        if err is not None:
            raise err
        return self.real(fd, buffers, offset, *args)


def random_ranges(rng: random.Random) -> list[tuple[int, int]]:
    out = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.2:  # aligned
            off = rng.randrange(0, SIZE // 4096) * 4096
            n = min(rng.randint(1, 4) * 4096, SIZE - off)
        elif kind < 0.4:  # ends exactly at EOF (its widened end lies past EOF)
            off = rng.randrange(0, SIZE - 1)
            n = SIZE - off
        else:
            off = rng.randrange(0, SIZE - 1)
            n = rng.randint(1, min(50_000, SIZE - off))
        out.append((off, n))
    return out


@pytest.mark.parametrize("direct_io", [True, False])
def test_bytes_match_plain_reads(datafile, direct_io):
    rng = random.Random(1)
    with ExpertReader(datafile, direct_io=direct_io, buffer_bytes=160 * 1024, fixed_buffers=4) as reader:
        cases = [(i, random_ranges(rng)) for i in range(150)]
        handles = [reader.read(i, r, priority=rng.choice([DEMAND, PREFETCH])) for i, r in cases]
        for (_, ranges), h in zip(cases, handles):
            want = np.frombuffer(expected(datafile, ranges), dtype=np.uint8)
            with h.result(timeout=T) as buf:
                np.testing.assert_array_equal(buf.copy(), want)
                at = 0
                for _, n in ranges:  # per-range views, and a view spanning the ranges
                    np.testing.assert_array_equal(buf.view(at, n), want[at : at + n])
                    at += n
                mid = len(want) // 3
                np.testing.assert_array_equal(buf.view(mid, len(want) - mid - 1), want[mid:-1])
                assert not buf.view(0, 1).flags.writeable
        assert reader.pool_free() == reader.stats.pool_buffers  # every lease returned
        st = reader.stats
        assert st.direct_io is direct_io and st.errors == 0 and st.reads == 150
        assert st.bytes_read >= st.bytes_requested > 0 and st.p99_ms >= st.p50_ms > 0 and st.gbps > 0


def test_read_past_eof_is_a_truncated_file(datafile):
    with ExpertReader(datafile, buffer_bytes=65536) as reader:
        with pytest.raises(ModelFormatError, match="truncated"):
            reader.read("k", [(SIZE - 100, 200)]).result(timeout=T)
        assert reader.pool_free() == 8


def test_oversize_read_gets_a_one_off_buffer(datafile):
    with ExpertReader(datafile, buffer_bytes=8192, fixed_buffers=1, max_buffers=1) as reader:
        with reader.read("big", [(100, 70_000)]).result(timeout=T) as buf:
            assert buf.copy().tobytes() == expected(datafile, [(100, 70_000)])
        assert reader.stats.oversize_reads == 1 and reader.stats.degraded_reads == 0


def test_concurrent_reads_of_one_key_are_merged(datafile, monkeypatch):
    gate = Gate(monkeypatch)
    ranges = [(5000, 30_000)]
    with ExpertReader(datafile, queue_depth=2, fixed_buffers=2, buffer_bytes=65536) as reader:
        handles, lock = [], threading.Lock()

        def ask():
            h = reader.read((3, 7), ranges)
            with lock:
                handles.append(h)

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        gate.open()
        bufs = [h.result(timeout=T) for h in handles]
        assert len(gate.offsets) == 1  # one preadv for twelve callers
        assert reader.stats.merged_reads == 11 and reader.stats.reads == 1
        want = expected(datafile, ranges)
        assert all(b.view().tobytes() == want for b in bufs)
        for b in bufs[:-1]:
            b.release()
        assert reader.pool_free() == 1  # still held by the last caller
        bufs[-1].release()
        bufs[-1].release()  # idempotent
        assert reader.pool_free() == 2


def test_demand_overtakes_queued_prefetch(datafile, monkeypatch):
    gate = Gate(monkeypatch)
    offset = {k: k * 4096 for k in range(8)}
    with ExpertReader(datafile, queue_depth=1, buffer_bytes=8192) as reader:
        first = reader.read(0, [(offset[0], 100)], priority=PREFETCH)
        assert gate.entered.wait(T)  # the only worker is busy with key 0
        hs = [reader.read(k, [(offset[k], 100)], priority=PREFETCH) for k in (1, 2, 3)]
        hs += [reader.read(k, [(offset[k], 100)], priority=DEMAND) for k in (4, 5)]
        hs.append(reader.read(2, [(offset[2], 100)], priority=DEMAND))  # promotes the queued prefetch of 2
        gate.open()
        for h in [first, *hs]:
            h.result(timeout=T).release()
        assert gate.offsets == [offset[k] for k in (0, 4, 5, 2, 1, 3)]
        assert reader.stats.promoted == 1


def test_cancel_prefetches(datafile, monkeypatch):
    gate = Gate(monkeypatch)
    with ExpertReader(datafile, queue_depth=1, buffer_bytes=8192) as reader:
        running = reader.read(0, [(0, 10)], priority=PREFETCH)
        assert gate.entered.wait(T)
        p1, p2, p3 = (reader.read(k, [(k * 4096, 10)], priority=PREFETCH) for k in (1, 2, 3))
        d2 = reader.read(2, [(2 * 4096, 10)], priority=DEMAND)
        assert reader.cancel_prefetches() == 2
        for h in (p1, p3):
            with pytest.raises(CancelledError):
                h.result(timeout=T)
        gate.open()
        for h in (running, p2, d2):
            h.result(timeout=T).release()
        assert gate.offsets == [0, 2 * 4096] and reader.stats.cancelled == 2


def test_pool_grows_then_degrades(datafile):
    with ExpertReader(datafile, fixed_buffers=2, max_buffers=3, buffer_bytes=16384) as reader:
        ranges = {k: [(k * 1000 + 7, 9000)] for k in range(5)}
        bufs = [reader.read(k, r).result(timeout=T) for k, r in ranges.items()]  # all held
        st = reader.stats
        assert st.pool_buffers == 3 and st.degraded_reads == 2 and reader.pool_free() == 0
        for k, b in enumerate(bufs):
            assert b.copy().tobytes() == expected(datafile, ranges[k])
            b.release()
        assert reader.pool_free() == 3
        reader.read("again", [(0, 9000)]).result(timeout=T).release()
        assert st.degraded_reads == 2


def test_release_before_completion_returns_the_buffer(datafile, monkeypatch):
    gate = Gate(monkeypatch)
    with ExpertReader(datafile, fixed_buffers=2, max_buffers=2, buffer_bytes=8192) as reader:
        h1, h2 = reader.read("k", [(0, 10)]), reader.read("k", [(0, 10)])
        solo = reader.read("solo", [(4096, 10)])
        h1.release()
        solo.release()  # nobody left to hold its buffer
        gate.open()
        h2.result(timeout=T).release()
        with pytest.raises(ValueError, match="released"):
            solo.result(timeout=T)
        assert reader.pool_free() == 2 and reader.stats.reads == 2 and reader.stats.degraded_reads == 0


def _check_fallback(path, reader_kwargs, n_reads=16):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ExpertReader(path, queue_depth=4, buffer_bytes=65536, **reader_kwargs) as reader:
            rng = random.Random(2)
            cases = [(k, random_ranges(rng)) for k in range(n_reads)]
            handles = [reader.read(k, r) for k, r in cases]
            for (_, r), h in zip(cases, handles):
                with h.result(timeout=T) as buf:
                    assert buf.copy().tobytes() == expected(path, r)
            direct = reader.stats.direct_io
    return direct, [w for w in caught if "O_DIRECT" in str(w.message)]


def test_o_direct_refused_at_open_falls_back_with_one_warning(datafile, monkeypatch):
    real_open = os.open

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    direct, warned = _check_fallback(datafile, {})
    assert direct is False and len(warned) == 1


def test_o_direct_refused_at_read_falls_back_with_one_warning(datafile, monkeypatch):
    gate = Gate(monkeypatch, fail=lambda fd, off: OSError(errno.EINVAL, "Invalid argument") if direct_fd(fd) else None)
    gate.open()
    direct, warned = _check_fallback(datafile, {})
    assert direct is False and len(warned) == 1
    assert any(o % 4096 for o in gate.offsets)  # the retries were buffered (unwidened) reads


def test_tmpfs():
    """/dev/shm is tmpfs: older kernels refuse O_DIRECT there (fallback, one warning), newer ones accept it."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = os.path.join("/dev/shm", f"edgemoe-test-{os.getpid()}.bin")
    try:
        with open(path, "wb") as f:
            f.write(np.random.default_rng(3).bytes(SIZE))
        direct, warned = _check_fallback(path, {})
        assert len(warned) == (0 if direct else 1)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32"])
def test_checksum(datafile, algorithm):
    """The CRC of the bytes read (several ranges, unaligned) against crc32c's and zlib's."""
    ranges = [(1234, 20_000), (90_000, 5000)]
    crc = (crc32c.crc32c if algorithm == "crc32c" else zlib.crc32)(expected(datafile, ranges))
    good, bad = f"{crc:08x}", f"{crc ^ 1:08x}"
    with ExpertReader(datafile, buffer_bytes=65536, verify=True, checksum_algorithm=algorithm) as reader:
        reader.read("ok", ranges, checksum=good).result(timeout=T).release()
        with pytest.raises(ChecksumError) as e:
            reader.read((5, 1), ranges, checksum=bad).result(timeout=T)
        assert "(5, 1)" in str(e.value) and str(datafile) in str(e.value) and "edgemoe partition" in str(e.value)
        assert isinstance(e.value, EdgeMoEError) and reader.pool_free() == 8
        with pytest.raises(UsageError):
            reader.read("x", ranges, checksum="not-hex")
    with ExpertReader(datafile, buffer_bytes=65536, verify=False) as reader:  # verification is opt-in
        reader.read("unchecked", ranges, checksum=bad).result(timeout=T).release()
    with pytest.raises(UsageError, match="unknown checksum algorithm"):
        ExpertReader(datafile, buffer_bytes=65536, checksum_algorithm="md5")


def test_io_error_reaches_every_waiter(datafile, monkeypatch):
    bad = range(65536, 2 * 65536)
    gate = Gate(monkeypatch, fail=lambda fd, off: OSError(errno.EIO, "Input/output error") if off in bad else None)
    with ExpertReader(datafile, fixed_buffers=2, buffer_bytes=65536) as reader:
        h1, h2 = reader.read((1, 2), [(70_000, 100)]), reader.read((1, 2), [(70_000, 100)])
        ok = reader.read((1, 3), [(100, 100)])
        gate.open()
        for h in (h1, h2):
            with pytest.raises(ExpertIOError) as e:
                h.result(timeout=T)
            assert "(1, 2)" in str(e.value) and str(datafile) in str(e.value) and "Input/output error" in str(e.value)
        assert ok.result(timeout=T).copy().tobytes() == expected(datafile, [(100, 100)])
        ok.release()
        assert reader.pool_free() == 2 and reader.stats.errors == 1


def test_throttling_loses_no_read(datafile):
    with ExpertReader(datafile, queue_depth=2, buffer_bytes=8192) as reader:
        reader.set_pacing(0.002)
        reader.set_queue_depth(1)
        handles = [reader.read(k, [(k * 3000, 2000)], priority=k % 2) for k in range(30)]
        reader.set_queue_depth(3)
        reader.set_pacing(0)
        for k, h in enumerate(handles):
            with h.result(timeout=T) as buf:
                assert buf.view().tobytes() == expected(datafile, [(k * 3000, 2000)])
        assert reader.stats.reads == 30 and reader.stats.queue_depth == 3
        with pytest.raises(UsageError):
            reader.set_pacing(-1)
        with pytest.raises(UsageError):
            reader.set_queue_depth(0)


def test_close_cancels_queued_reads_and_joins(datafile, monkeypatch):
    gate = Gate(monkeypatch)
    reader = ExpertReader(datafile, queue_depth=1, buffer_bytes=8192)
    running = reader.read("a", [(0, 10)])
    assert gate.entered.wait(T)
    queued = reader.read("b", [(4096, 10)])
    closer = threading.Thread(target=reader.close)
    closer.start()
    with pytest.raises(CancelledError):
        queued.result(timeout=T)
    gate.open()
    closer.join(T)
    assert not closer.is_alive()
    assert running.result(timeout=T).view().tobytes() == expected(datafile, [(0, 10)])
    with pytest.raises(RuntimeError):
        reader.read("c", [(0, 10)])


def test_bad_settings_and_missing_file(datafile, tmp_path):
    with pytest.raises(UsageError):
        ExpertReader(datafile, queue_depth=0, buffer_bytes=4096)
    with pytest.raises(UsageError):
        ExpertReader(datafile, fixed_buffers=8, max_buffers=4, buffer_bytes=4096)
    with pytest.raises(ModelFormatError):
        ExpertReader(tmp_path / "missing.bin", buffer_bytes=4096)


def test_large_direct_reads_go_out_in_concurrent_pieces(datafile, monkeypatch):
    """A long O_DIRECT read is split into aligned pieces read at once: same bytes, same truncation
    and error reports, and the buffer goes back only after every piece has finished."""
    import edgemoe.experts.io as io_mod

    monkeypatch.setattr(io_mod, "PIECE_BYTES", 16384)
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off, *a: calls.append(off) or real(fd, bufs, off, *a))
    rng = random.Random(5)
    with ExpertReader(datafile, buffer_bytes=SIZE + 8192, fixed_buffers=2) as reader:
        for i in range(20):
            ranges = random_ranges(rng) + [(rng.randrange(0, SIZE - 60_000), 60_000)]
            with reader.read(i, ranges).result(timeout=T) as buf:
                assert buf.copy().tobytes() == expected(datafile, ranges)
        assert reader.stats.direct_io and len(calls) > 20 * 4  # the 60 kB ranges took several requests each
        with pytest.raises(ModelFormatError, match="truncated"):
            reader.read("tail", [(SIZE - 50_000, 60_000)]).result(timeout=T)
        assert reader.pool_free() == reader.stats.pool_buffers
    bad = range(65536, 65536 + 16384)
    gate = Gate(monkeypatch, fail=lambda fd, off: OSError(errno.EIO, "Input/output error") if off in bad else None)
    gate.open()
    with ExpertReader(datafile, buffer_bytes=SIZE + 8192, fixed_buffers=1) as reader:
        with pytest.raises(ExpertIOError, match="Input/output error"):
            reader.read("bad", [(0, 3 * 65536)]).result(timeout=T)
        assert reader.pool_free() == 1 and reader.stats.errors == 1


def test_prefetch_yields_to_a_running_demand(tmp_path, monkeypatch):
    """A prefetch reads in PREFETCH_PIECE_BYTES pieces and starts none while a demand read runs."""
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    events, real = [], os.preadv
    demand_at = 3 << 20

    def preadv(fd, buffers, offset, *args):
        events.append(("start", offset))
        if offset == demand_at:
            time.sleep(0.3)  # a slow demand: prefetch pieces would start meanwhile if nothing held them
        n = real(fd, buffers, offset, *args)
        events.append(("end", offset))
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(io_mod, "PREFETCH_PIECE_BYTES", 128 << 10)
    with ExpertReader(path, queue_depth=4, buffer_bytes=2 << 20) as reader:
        pre = reader.read("p", [(0, 2 << 20)], priority=PREFETCH)
        deadline = time.monotonic() + T
        while ("start", 0) not in events and time.monotonic() < deadline:
            time.sleep(0.001)
        demand = reader.read("d", [(demand_at, 65536)], priority=DEMAND)
        assert demand.result(timeout=T).copy().tobytes() == expected(path, [(demand_at, 65536)])
        assert pre.result(timeout=T).copy().tobytes() == expected(path, [(0, 2 << 20)])
        demand.release()
        pre.release()
    window = events[events.index(("start", demand_at)):events.index(("end", demand_at))]
    assert not [e for e in window if e[0] == "start" and e[1] < 2 << 20], events
    assert len([e for e in events if e[0] == "start" and e[1] < 2 << 20]) >= 2 << 20 >> 17  # in 128 KB pieces


def test_prefetches_leave_a_worker_for_demands(datafile, monkeypatch):
    """With queue depth 4 at most 2 prefetches run at once (PREFETCH_SHARE); a demand starts beside them."""
    gate = Gate(monkeypatch)
    with ExpertReader(datafile, queue_depth=4, buffer_bytes=8192) as reader:
        pre = [reader.read(k, [(k * 4096, 100)], priority=PREFETCH + k % 2) for k in range(4)]
        deadline = time.monotonic() + T
        while len(gate.offsets) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.1)
        assert len(gate.offsets) == 2  # two more wait for a prefetch slot
        demand = reader.read("d", [(8 * 4096, 100)], priority=DEMAND)
        while len(gate.offsets) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert gate.offsets[2] == 8 * 4096
        gate.open()
        for h in [*pre, demand]:
            h.result(timeout=T).release()
        assert sorted(gate.offsets) == [k * 4096 for k in (0, 1, 2, 3, 8)]
