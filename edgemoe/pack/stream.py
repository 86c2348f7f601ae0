"""Write a GGUF file tensor by tensor from chunk generators, so memory stays at about one chunk.

gguf.GGUFWriter writes the header, the metadata and the tensor infos; the tensor data is streamed here
in the layout GGUFWriter gives it (data section aligned to `writer.data_alignment`, every tensor padded
to it), and the absolute offsets are returned so callers can describe byte ranges of the file.
GGUFWriter.add_tensor would keep every tensor in memory until the end.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from ..qtensor import row_bytes
from ..quants import dequantize, quantize
from .checksum import update
from .manifest import CHECKSUM

CHUNK_BYTES = 64 << 20  # bytes per write when copying
_CHUNK_VALUES = 1 << 22  # values per (de)quantisation pass when converting (16 MiB of float32)


@dataclass(frozen=True)
class TensorJob:
    """One tensor to write: its GGUF name, storage type, logical shape and a source of its raw bytes."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (..., cols); GGUF stores the reverse
    chunks: Callable[[], Iterable[np.ndarray]]  # the raw storage in file order, as arrays of any dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.qtype, self.shape[-1])

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], row_bytes(self.qtype, self.shape[-1]))


@dataclass
class Layout:
    """Where a written file put each tensor."""

    data_offset: int  # absolute offset of the tensor data section
    offsets: list[int]  # absolute offset of each job's data, in job order
    file_bytes: int
    group_crcs: list[int] = field(default_factory=list)  # CRC (manifest.CHECKSUM) of each requested group's byte range


def raw_chunks(data: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Callable[[], Iterator[np.ndarray]]:
    """Chunks of a C-contiguous array's bytes (a zero-copy memmap view stays zero-copy)."""
    if not data.flags.c_contiguous:
        raise ValueError("raw_chunks wants a C-contiguous array")

    def gen() -> Iterator[np.ndarray]:
        flat = data.reshape(-1).view(np.uint8)  # (nbytes,)
        for s in range(0, flat.size, chunk_bytes):
            yield flat[s : s + chunk_bytes]
            release_pages(flat[s : s + chunk_bytes])

    return gen


def converted_chunks(rows: np.ndarray, src: GGMLQuantizationType, cols: int,
                     dst: GGMLQuantizationType) -> Callable[[], Iterator[np.ndarray]]:
    """rows: uint8 (R, row_bytes) stored as `src` → the same rows re-encoded as `dst`, a few rows at a time."""
    if src == dst:
        return raw_chunks(np.ascontiguousarray(rows))
    step = max(1, _CHUNK_VALUES // cols)

    def gen() -> Iterator[np.ndarray]:
        for r in range(0, rows.shape[0], step):
            out = quantize(dequantize(rows[r : r + step], src, cols), dst)  # (step, dst row_bytes)
            release_pages(rows[r : r + step])
            yield out

    return gen


def release_pages(a: np.ndarray) -> None:
    """Unmap the pages under `a` if it is a view of an np.memmap (best effort; no-op otherwise).

    Copying through a memory map faults every page of the source into this process: a 25 GB source
    would end with a 25 GB resident set. MADV_DONTNEED drops them from the process; the data stays in
    the page cache (or on disk) and is read back on the next access.
    """
    m = a
    while m is not None and not isinstance(m, np.memmap):
        m = m.base
    mm = getattr(m, "_mmap", None)
    if mm is None or getattr(m, "mode", None) != "r" or not hasattr(mm, "madvise") or a.size == 0:
        return  # only read-only maps: on a copy-on-write map, DONTNEED would discard changes
    try:
        start = a.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data  # offset inside the mapping
        lo = start - start % mmap.PAGESIZE
        hi = start + a.nbytes
        hi -= hi % mmap.PAGESIZE  # keep a partial last page: the next chunk may still be using it
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, TypeError):
        pass


def write_gguf(writer: GGUFWriter, path: str | os.PathLike, jobs: Sequence[TensorJob], *,
               groups: Sequence[tuple[int, int]] = (), progress: bool | None = None, desc: str = "writing") -> Layout:
    """Write `jobs` as the tensors of a GGUF file at `path`, with the metadata already added to `writer`.

    groups: (first, last) job indices (inclusive, consecutive jobs); for each, the CRC-32 of the file bytes
    from the first job's start to the last job's end, padding between them included, is computed while
    writing. progress: tqdm bar on stderr (None: only when stderr is a terminal). The file is flushed to
    disk (fsync) before returning; the writer is closed in every case.
    """
    from tqdm import tqdm

    group_of: dict[int, int] = {}
    for g, (first, last) in enumerate(groups):
        for j in range(first, last + 1):
            group_of[j] = g
    crcs = [0] * len(groups)
    align = writer.data_alignment
    try:
        for job in jobs:
            writer.add_tensor_info(job.name, job.byte_shape, np.dtype(np.uint8), job.nbytes, raw_dtype=job.qtype)
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        f.write(bytes(-f.tell() % align))
        data_offset = f.tell()
        offsets = []
        total = sum(job.nbytes for job in jobs)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=None if progress is None else not progress) as bar:
            for j, job in enumerate(jobs):
                offsets.append(f.tell())
                g = group_of.get(j)
                n = 0
                for chunk in job.chunks():
                    buf = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                    f.write(buf)
                    n += len(buf)
                    if g is not None:
                        crcs[g] = update(CHECKSUM, crcs[g], buf)
                    bar.update(len(buf))
                assert n == job.nbytes, f"{job.name}: wrote {n} bytes, expected {job.nbytes}"
                pad = bytes(-n % align)
                f.write(pad)
                if g is not None and group_of.get(j + 1) == g:
                    crcs[g] = update(CHECKSUM, crcs[g], pad)
        f.flush()
        os.fsync(f.fileno())
        file_bytes = f.tell()
    finally:
        writer.close()
    return Layout(data_offset, offsets, file_bytes, crcs)

