"""Measure this machine's disk the way the expert reader uses it: O_DIRECT sequential GB/s at 1 MiB and
4 MiB requests on 1/2/4/8 threads, buffered (page cache) sequential GB/s, and random-read latency
p50/p99 from 4 KiB to 4 MiB.

    python tools/bench_disk.py [--size-gb 2] [--dir /path/on/the/model/disk] [--seconds 2] [--json]

A temporary file of --size-gb is written first (fsync'd), then evicted from the page cache
(`posix_fadvise(DONTNEED)` always; `echo 3 > /proc/sys/vm/drop_caches` as root) before each buffered
measurement. A virtual disk's host may cache too: repeated passes over a small file can read faster
than the device. The machine may be shared; quote medians of several runs.

`measure_direct_read_gbs(path, seconds=...)` (and `measure_buffered_read_gbs`) measure an existing
file, e.g. a model, for benchmarks and `edgemoe doctor`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe.doctor_disk import filesystem, open_direct
from edgemoe.errors import UnsupportedError

MiB = 1 << 20
ALIGN = 4096
SEQ_REQUESTS = (1 * MiB, 4 * MiB)
SEQ_THREADS = (1, 2, 4, 8)
BUFFERED_THREADS = (1, 2, 4)
RANDOM_SIZES = (4096, 64 * 1024, 1 * MiB, 4 * MiB)


def _size_name(n: int) -> str:
    return f"{n // MiB}MiB" if n % MiB == 0 else f"{n // 1024}KiB"


def _open_direct(path) -> int:
    try:
        return open_direct(path)
    except OSError as e:
        raise UnsupportedError(f"{path}: O_DIRECT is not supported on this filesystem ({e.strerror})") from e


def _sequential(fd: int, size: int, request: int, threads: int, seconds: float, start: int = 0) -> tuple[int, float]:
    """Read `request`-sized chunks in file order from `start` (wrapping), `threads` at once, for at most
    `seconds` and one pass over the file. Returns (bytes read, wall seconds)."""
    n_chunks = max(size // request, 1)
    lock = threading.Lock()
    issued = [0]  # chunks handed out
    done = [0] * threads
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds

    def run(i: int) -> None:
        buf = mmap.mmap(-1, request)  # page-aligned, as O_DIRECT needs
        try:
            while time.perf_counter() < deadline:
                with lock:
                    k = issued[0]
                    if k >= n_chunks:
                        return
                    issued[0] += 1
                done[i] += os.preadv(fd, [buf], ((start // request + k) % n_chunks) * request)
        except BaseException as e:  # reported by the caller thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return sum(done), time.perf_counter() - t0


def measure_direct_read_gbs(path, seconds: float = 2.0, request_bytes: int = 4 * MiB, threads: int = 2,
                            start: int = 0) -> float:  # fmt: skip
    """O_DIRECT sequential read bandwidth (GB/s, 1e9 bytes) over an existing file, for at most `seconds`
    and one pass. Raises `UnsupportedError` when the filesystem refuses O_DIRECT."""
    if request_bytes % ALIGN:
        raise ValueError(f"request_bytes must be a multiple of {ALIGN}, got {request_bytes}")
    fd = _open_direct(path)
    try:
        nbytes, wall = _sequential(fd, os.fstat(fd).st_size, request_bytes, threads, seconds, start)
    finally:
        os.close(fd)
    return nbytes / wall / 1e9


def evict(path) -> bool:
    """Drop `path` from the page cache; True when the whole cache was dropped too (root only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure_buffered_read_gbs(path, seconds: float = 2.0, request_bytes: int = 1 * MiB, threads: int = 2,
                              evict_first: bool = True) -> float:  # fmt: skip
    """Buffered (page cache) sequential read bandwidth in GB/s over an existing file; `evict_first`
    drops its cached pages first so the figure is the disk's, not RAM's."""
    if evict_first:
        evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        nbytes, wall = _sequential(fd, os.fstat(fd).st_size, request_bytes, threads, seconds)
    finally:
        os.close(fd)
    return nbytes / wall / 1e9


def random_read_latency_ms(path, size: int, seconds: float = 1.0, max_samples: int = 2000, seed: int = 0) -> dict:
    """p50/p99 latency (ms) of single `size`-byte O_DIRECT reads at random aligned offsets, one at a time."""
    fd = _open_direct(path)
    rng = np.random.default_rng(seed)
    buf = mmap.mmap(-1, size)
    samples = []
    try:
        n_slots = max((os.fstat(fd).st_size - size) // ALIGN, 1)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and len(samples) < max_samples:
            off = int(rng.integers(0, n_slots)) * ALIGN
            t0 = time.perf_counter()
            os.preadv(fd, [buf], off)
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
    p50, p99 = np.percentile(samples, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "n": len(samples)}


def write_test_file(path, size: int) -> float:
    """Write `size` random bytes (incompressible) and fsync; returns the write GB/s."""
    rng = np.random.default_rng(0)
    chunk = 64 * MiB
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return size / (time.perf_counter() - t0) / 1e9


def run(size_gb: float, directory: str, seconds: float) -> dict:
    size = int(size_gb * 1e9) // (4 * MiB) * (4 * MiB)
    fd, path = tempfile.mkstemp(prefix="edgemoe-bench-", suffix=".bin", dir=directory)
    os.close(fd)
    notes = []
    try:
        write_gbs = write_test_file(path, size)
        dropped = evict(path)
        if not dropped:
            notes.append("not root: only posix_fadvise(DONTNEED) evicted the file; buffered figures may be inflated")
        direct = {}
        try:
            start = 0
            for req in SEQ_REQUESTS:
                for th in SEQ_THREADS:
                    direct[f"{req // MiB}MiB/{th}t"] = measure_direct_read_gbs(path, seconds, req, th, start)
                    start += size // 3  # each run starts elsewhere, so no run re-reads the last one's data first
            latency = {_size_name(n): random_read_latency_ms(path, n, seconds / 2) for n in RANDOM_SIZES}
        except UnsupportedError as e:
            notes.append(str(e))
            latency = {}
        buffered = {f"1MiB/{th}t": measure_buffered_read_gbs(path, seconds, MiB, th) for th in BUFFERED_THREADS}
    finally:
        os.unlink(path)
    return {
        "dir": os.path.realpath(directory),
        "filesystem": filesystem(directory),
        "size_gb": size / 1e9,
        "seconds_per_run": seconds,
        "write_fsync_gbs": write_gbs,
        "cache_dropped": dropped,
        "direct_gbs": direct,
        "buffered_gbs": buffered,
        "random_latency": latency,
        "notes": notes,
    }


def render(r: dict) -> str:
    lines = [
        f"disk benchmark: {r['dir']} ({r['filesystem']}), {r['size_gb']:.2f} GB file, "
        f"write+fsync {r['write_fsync_gbs']:.2f} GB/s",
        "",
        f"{'sequential read':<24}{'1 thread':>10}{'2':>10}{'4':>10}{'8':>10}   GB/s",
    ]
    for req in SEQ_REQUESTS:
        row = [r["direct_gbs"].get(f"{req // MiB}MiB/{th}t") for th in SEQ_THREADS]
        lines.append(f"{f'O_DIRECT {req // MiB} MiB':<24}" + "".join(f"{v:>10.2f}" if v else f"{'-':>10}" for v in row))
    row = [r["buffered_gbs"].get(f"1MiB/{th}t") for th in SEQ_THREADS]
    lines.append(f"{'buffered 1 MiB':<24}" + "".join(f"{v:>10.2f}" if v else f"{'-':>10}" for v in row))
    if r["random_latency"]:
        lines += ["", f"{'random O_DIRECT read':<24}{'p50 ms':>10}{'p99 ms':>10}{'n':>10}"]
        for name, s in r["random_latency"].items():
            lines.append(f"{name:<24}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}{s['n']:>10}")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="test file size (default 2)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it: the disk the model lives on")
    p.add_argument("--seconds", type=float, default=2.0, help="time limit of each sequential run (default 2)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = p.parse_args(argv)
    if a.size_gb <= 0 or a.seconds <= 0:
        p.error("--size-gb and --seconds must be > 0")
    result = run(a.size_gb, a.dir, a.seconds)
    print(render(result))
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
