"""Benchmark the matrix kernels: matvec weight GB/s against this machine's DRAM read GB/s, and
matmul GFLOP/s at a few batch sizes. Medians are the headline; the best run is shown too, as on a
shared machine it approximates the uncontended speed.

Each matvec run is paired with a DRAM read of 256 MiB right after it, and the share of the bandwidth
is the median of the per-pair ratios: a shared machine's bandwidth drifts by tens of per cent within
minutes, and a pair sees the same neighbours.

    python tools/bench_kernels.py [--threads 2] [--types Q4_0,Q4_K] [--repeat 15] [--layouts plain,x8]

Weights are random valid blocks (scales set to small finite values), so no model is needed. The
machine may be shared: every figure is a median, and the bandwidth is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe.kernels import matmul, matvec, set_threads
from edgemoe.kernels.dispatch import current_variant
from edgemoe.kernels.kinds import KINDS
from edgemoe.kernels.layouts import X8, interleave
from edgemoe.membw import _read_all
from edgemoe.qtensor import FORMATS, QTensor

TYPES = tuple(t.name for t in FORMATS)
SHAPES = (
    (14336, 4096),
    (4096, 14336),
    (768, 2048),
)  # Mixtral w1/w3, w2; a small-MoE expert


def timings(fn, repeat: int) -> tuple[float, float]:
    """(median, best) seconds of `repeat` calls after a warm-up call (compile, page in)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def paired(fn, nbytes: int, buf: np.ndarray, repeat: int) -> tuple[float, float, float]:
    """(median GB/s of fn, median GB/s of the DRAM read, median per-pair ratio) over `repeat` pairs
    of one fn call (`nbytes` of weights) and one parallel read of `buf`."""
    fn()
    _read_all(buf)
    kern, mem = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _read_all(buf)
        t2 = time.perf_counter()
        kern.append(nbytes / (t1 - t) / 1e9)
        mem.append(buf.nbytes / (t2 - t1) / 1e9)
    ratios = [k / m for k, m in zip(kern, mem)]
    return statistics.median(kern), statistics.median(mem), statistics.median(ratios)


def read_bandwidth(buf: np.ndarray, repeat: int) -> tuple[float, float]:
    """(median, best) GB/s of a parallel streaming read over `buf`."""
    med, best = timings(lambda: _read_all(buf), repeat)  # the package's own bandwidth probe
    return buf.nbytes / med / 1e9, buf.nbytes / best / 1e9


def random_weight(qt: QT, rows: int, cols: int, rng: np.random.Generator) -> QTensor:
    """A (rows, cols) weight of type `qt` with random contents and finite scales."""
    if qt == QT.F32:
        return QTensor.from_array(rng.standard_normal((rows, cols), dtype=np.float32), qt, rows, cols)
    if qt == QT.F16:
        return QTensor.from_array(
            rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16),
            qt,
            rows,
            cols,
        )
    if qt == QT.BF16:
        bits = rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint32) >> 16
        return QTensor.from_array(bits.astype(np.uint16), qt, rows, cols)
    fmt = FORMATS[qt]  # the scale fields are set to small finite values
    n_blocks = cols // fmt.values
    blocks = rng.integers(0, 256, (rows, n_blocks, fmt.bytes), dtype=np.uint8)
    if fmt.scale == "e8m0":  # powers of two 2**-8 .. 2**-3
        scales = rng.integers(120, 126, (rows, n_blocks, 1), dtype=np.uint8)
    else:
        scales = rng.uniform(1e-3, 1e-2, (rows, n_blocks)).astype(np.float16).view(np.uint8).reshape(rows, n_blocks, 2)
    for off in fmt.scale_offsets:
        blocks[:, :, off : off + scales.shape[2]] = scales
    if qt == QT.IQ1_M:  # no d field: its 4 nibbles are the tops of the four uint16 scales at 48
        sc, d = blocks[:, :, 48:56].copy().view(np.uint16), scales.copy().view(np.uint16)  # (R, B, 4), (R, B, 1)
        blocks[:, :, 48:56] = ((sc & 0x0FFF) | (((d >> np.arange(0, 16, 4, dtype=np.uint16)) & 0xF) << 12)).view(np.uint8)
    return QTensor.from_array(blocks, qt, rows, cols)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="kernel threads (default 2)")
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated weight types")
    p.add_argument("--repeat", type=int, default=15, help="timed runs per figure (median)")
    p.add_argument("--tokens", default="8,32,64", help="batch sizes for the matmul GFLOP/s")
    p.add_argument("--layouts", default="plain,x8", help="plain and/or x8 (the 8-row interleaved layout, where a type has one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    types = [QT[t.strip().upper()] for t in args.types.split(",") if t.strip()]
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, repeat {args.repeat}")

    print(f"load average {os.getloadavg()[0]:.1f} (other processes skew shared-machine figures)")
    buf = np.ones(1 << 28, np.float32)  # 1 GiB
    bw_runs = [read_bandwidth(buf, args.repeat)]
    print(f"DRAM read (1 GiB parallel sum): median {bw_runs[0][0]:.1f} GB/s, best {bw_runs[0][1]:.1f}")

    probe = np.ones(1 << 26, np.float32)  # 256 MiB, read after each matvec run
    results = []  # (type, rows, cols, median GB/s, best GB/s, paired DRAM GB/s, median ratio)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    runs = [(qt, lay) for qt in types for lay in layouts if lay == "plain" or (lay == "x8" and qt in X8)]
    for qt, lay in runs:
        label = qt.name + ("x8" if lay == "x8" else "")
        kernel = KINDS[(qt, 8 if lay == "x8" else 1)].isa[current_variant(qt.name)]

        def make(rows, cols, qt=qt, lay=lay):
            w = random_weight(qt, rows, cols, rng)
            return interleave(w) if lay == "x8" else w

        for rows, cols in SHAPES:
            w = make(rows, cols)
            x = rng.standard_normal(cols, dtype=np.float32)
            out = np.empty(rows, np.float32)
            med, best = timings(lambda o=out, w=w, x=x: matvec(o, w, x), args.repeat)
            kern, mem, ratio = paired(lambda o=out, w=w, x=x: matvec(o, w, x), w.nbytes, probe, args.repeat)
            results.append((label, rows, cols, w.nbytes / med / 1e9, w.nbytes / best / 1e9, mem, ratio))
            print(
                f"  matvec {label:8s} {rows:5d}x{cols:<5d} {w.nbytes / 1e6:6.1f} MB  "
                f"median {w.nbytes / med / 1e9:5.1f} GB/s ({med * 1e3:6.2f} ms), "
                f"best {w.nbytes / best / 1e9:5.1f}; paired with DRAM {mem:5.1f} GB/s: {100 * ratio:3.0f} %"
                f"  [{kernel}]",
                flush=True,
            )
        rows, cols = SHAPES[0]
        w = make(rows, cols)
        for n_tok in tokens:
            x = rng.standard_normal((n_tok, cols), dtype=np.float32)
            out = np.empty((n_tok, rows), np.float32)
            n = max(3, args.repeat // 3)
            med, best = timings(lambda o=out, w=w, x=x: matmul(o, w, x), n)
            flop = 2 * rows * cols * n_tok
            print(
                f"  matmul {label:8s} {rows:5d}x{cols:<5d} T={n_tok:<3d} "
                f"median {flop / med / 1e9:6.1f} GFLOP/s ({med * 1e3:7.2f} ms), best {flop / best / 1e9:6.1f}",
                flush=True,
            )

    bw_runs.append(read_bandwidth(buf, args.repeat))
    bw_med = statistics.median(r[0] for r in bw_runs)
    bw_best = max(r[1] for r in bw_runs)
    print(f"DRAM read again: median {bw_runs[1][0]:.1f} GB/s, best {bw_runs[1][1]:.1f}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"\nmatvec weight bytes/s vs DRAM read (whole run: median {bw_med:.1f} GB/s, best {bw_best:.1f}; "
          "paired: each run against the read right after it, median of the ratios):")
    print(f"{'type':8s} {'shape':>11s} {'median':>7s} {'of DRAM':>8s} {'best':>6s} {'of best':>8s} {'paired':>7s}")
    for name, rows, cols, med_gbs, best_gbs, _mem, ratio in results:
        print(
            f"{name:8s} {rows:5d}x{cols:<5d} {med_gbs:7.1f} {100 * med_gbs / bw_med:7.0f}% "
            f"{best_gbs:6.1f} {100 * best_gbs / bw_best:7.0f}% {100 * ratio:6.0f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
