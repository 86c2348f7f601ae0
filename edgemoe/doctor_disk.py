"""Disk checks of `edgemoe-doctor`: filesystem, block device, O_DIRECT, measured read bandwidth and latency.

Measurements read the model file itself with O_DIRECT (no page cache), at random 4096-aligned offsets,
into page-aligned `mmap` buffers: what the expert reader does.
"""

from __future__ import annotations

import mmap
import os
import random
import statistics
import threading
import time

import psutil

from .thermal import block_device, device_node, find_sensor

ALIGN = 4096
LATENCY_SIZES = (4096, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024)


def open_direct(path: str) -> int:
    """An O_DIRECT read-only descriptor (raises OSError when the filesystem refuses)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECT)


def filesystem(path: str) -> str:
    """'ext4 on /dev/vda (/)' for the mount holding `path`."""
    path = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) > len(best.mountpoint)):
            best = part
    return f"{best.fstype} on {best.device} ({best.mountpoint})" if best else "unknown"


def describe_block_device(path: str) -> str | None:
    """'/dev/nvme0n1: Samsung SSD 980, SSD, 931.5 GiB' for the disk holding `path`; None without one."""
    sys_dir = block_device(path)
    if sys_dir is None:
        return None
    disk = os.path.dirname(sys_dir) if os.path.exists(os.path.join(sys_dir, "partition")) else sys_dir

    def read(*rel: str) -> str | None:
        try:
            with open(os.path.join(disk, *rel)) as f:
                return f.read().strip()
        except OSError:
            return None

    parts = [device_node(sys_dir)]
    model = read("device", "model")
    if model:
        parts.append(model)
    rot = read("queue", "rotational")
    if rot is not None:
        parts.append("rotational disk" if rot == "1" else "SSD / virtual disk")
    size = read("size")
    if size and size.isdigit():
        parts.append(f"{int(size) * 512 / 2**30:.1f} GiB")
    return ", ".join(parts)


def measured_file(path: str) -> str | None:
    """The file to measure: `path` itself, or the largest file of a checkpoint directory."""
    if os.path.isfile(path):
        return path
    files = [os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))]
    return max(files, key=os.path.getsize) if files else None


def probe_direct(path: str) -> tuple[bool, str]:
    """(works, detail): opening with O_DIRECT and reading one aligned block."""
    try:
        fd = open_direct(path)
    except OSError as e:
        return False, f"refused by the filesystem ({e.strerror})"
    try:
        buf = mmap.mmap(-1, ALIGN)
        os.preadv(fd, [buf], 0)
        return True, "works"
    except OSError as e:
        return False, f"read failed ({e.strerror})"
    finally:
        os.close(fd)


def _open_for_bench(path: str, direct: bool) -> int:
    if direct:
        return open_direct(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop cached pages, so the first pass hits the disk
    return fd


def _offsets(size: int, chunk: int, rng: random.Random):
    top = max(0, (size - chunk) // ALIGN)
    while True:
        yield rng.randint(0, top) * ALIGN


# Reads at once when measuring the disk's limit for a bound (edgemoe bench, tools/compare_llamacpp.py):
# enough requests in flight that more do not read faster (a virtual disk here: 0.67 GB/s with one
# 4 MB read at a time, 0.76 with two, 0.92 with eight).
LIMIT_THREADS = 8


def read_bandwidth(path: str, *, seconds: float = 1.0, threads: int = 4, chunk: int = 4 * 2**20,
                   direct: bool = True) -> float:
    """Bytes per second of `threads` concurrent random `chunk`-byte reads of `path` for about `seconds`."""
    size = os.path.getsize(path)
    chunk = max(ALIGN, min(chunk, size // ALIGN * ALIGN))
    total = [0] * threads
    deadline = time.perf_counter() + seconds

    def work(i: int) -> None:
        fd = _open_for_bench(path, direct)
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
        try:
            for off in _offsets(size, chunk, random.Random(i)):
                total[i] += os.preadv(fd, [buf], off)
                if time.perf_counter() >= deadline:
                    break
        finally:
            os.close(fd)
            buf.close()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(total) / (time.perf_counter() - t0)


def read_latency(path: str, *, seconds_each: float = 0.15, direct: bool = True) -> dict[int, float]:
    """Median seconds of one random read, per size in LATENCY_SIZES that fits in the file."""
    size = os.path.getsize(path)
    fd = _open_for_bench(path, direct)
    out = {}
    try:
        for n in LATENCY_SIZES:
            if n > max(ALIGN, size // ALIGN * ALIGN):
                break
            buf = mmap.mmap(-1, n)
            samples: list[float] = []
            end = time.perf_counter() + seconds_each
            for off in _offsets(size, n, random.Random(n)):
                t0 = time.perf_counter()
                os.preadv(fd, [buf], off)
                samples.append(time.perf_counter() - t0)
                if time.perf_counter() >= end or len(samples) >= 200:
                    break
            buf.close()
            out[n] = statistics.median(samples)
    finally:
        os.close(fd)
    return out


def _size(n: int) -> str:
    return f"{n // 2**20} MB" if n >= 2**20 else f"{n // 1024} KB"


def disk_checks(path: str, *, require_direct: bool, queue_depth: int, seconds: float = 1.0):
    """Rows (name, ok, value, fix, hard) about the storage under model `path`, and measured figures."""
    rows = [("model filesystem", None, filesystem(path), "", False)]
    dev = describe_block_device(path)
    rows.append(("block device", None, dev or "none (tmpfs, overlay, btrfs or network filesystem)", "", False))
    figures: dict = {}
    target = measured_file(path)
    if target is None:
        rows.append(("O_DIRECT reads", None, "not checked (no file in the directory)", "", False))
        return rows, figures
    works, detail = probe_direct(target)
    fix = ("" if works else "move the model to ext4 or xfs on a local SSD"
           + (", or set ssd.direct_io: false to accept page-cache reads" if require_direct else ""))
    rows.append(("O_DIRECT reads", works, detail + ("" if works or require_direct else " (ssd.direct_io is off)"),
                 fix, require_direct and not works))
    how = "O_DIRECT" if works else "buffered, page cache may inflate it"
    bw = read_bandwidth(target, seconds=seconds, threads=max(1, min(queue_depth, 8)), direct=works)
    lat = read_latency(target, seconds_each=min(0.15, seconds / 4), direct=works)
    figures["disk_read_bytes_per_s"] = bw
    figures["disk_latency_s"] = {str(n): s for n, s in lat.items()}
    small = os.path.getsize(target) < 256 * 2**20
    note = "; file < 256 MB, the drive's cache may inflate it" if small else ""
    rows.append(("disk read bandwidth", None, f"{bw / 1e9:.2f} GB/s ({how}, {max(1, min(queue_depth, 8))} reads "
                 f"in flight, random 4 MB){note}", "", False))
    rows.append(("disk read latency", None,
                 ", ".join(f"{_size(n)} {s * 1e3:.2f} ms" for n, s in lat.items()) + " (median, random)", "", False))
    sensor, how_found = find_sensor(path)
    temp = sensor.read() if sensor else None
    if temp is not None:
        figures["ssd_temperature_c"] = temp
        rows.append(("SSD temperature", True, f"{temp:.0f} °C via {how_found}", "", False))
    else:
        rows.append(("SSD temperature", False, f"unavailable: {how_found}",
                     "install smartmontools (needs root) or use an NVMe drive (kernel hwmon sensor); "
                     "without it the thermal governor stays idle", False))
    return rows, figures
