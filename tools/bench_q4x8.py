"""Benchmark matvec / matmul of one weight type: the plain-layout kernel against its 8-row interleaved layout
(any type of `edgemoe.kernels.layouts.X8`), per thread count.

    python tools/bench_q4x8.py [--type Q4_0|Q3_K|IQ4_XS|...] [--threads 1,2] [--repeat 9] [--dram-mb 600]

"L3" runs one matrix over and over (it stays in the 32 MB L3); "DRAM" cycles through enough
copies (64 for the small shapes, at least --dram-mb MB in all) that each is read from memory.
Both layouts are timed alternately in the same loop (the machine is shared): medians of
--repeat runs; a DRAM run is one pass over all copies. Figures are weight GB/s (plain
bytes; both layouts have the same size) and µs per matvec, with the call overhead included.
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

from bench_kernels import random_weight  # noqa: E402

from edgemoe.kernels import layouts, matmul, matvec, set_threads  # noqa: E402
from edgemoe.qtensor import QTensor  # noqa: E402

SHAPES = ((3584, 1024), (1024, 3584), (4096, 4096))  # (rows, cols)
TOKENS = (8, 64)


def alternate(fns: dict, repeat: int) -> dict:
    """{name: (median, best) seconds} of `repeat` runs of each fn, run alternately after a warm-up.

    The best run approximates the uncontended speed on a shared machine; the median is the headline.
    """
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for i in range(repeat):
        names = list(fns) if i % 2 == 0 else list(fns)[::-1]  # no fixed order bias
        for k in names:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--type", default="Q4_0", choices=[t.name for t in layouts.X8], help="weight type (default Q4_0)")
    p.add_argument("--threads", default="1,2", help="thread counts to test (default 1,2)")
    p.add_argument("--repeat", type=int, default=15, help="timed runs per figure (median; >= 7)")
    p.add_argument("--dram-mb", type=int, default=600, help="least MB of copies for the DRAM runs")
    p.add_argument("--no-dram", action="store_true", help="skip the DRAM runs")
    return p


def bench_matvec(rows: int, cols: int, threads: list[int], args, rng) -> None:
    """Print plain vs x8 matvec µs and GB/s, L3-resident and from DRAM, per thread count."""
    qt = QT[args.type]
    plain = random_weight(qt, rows, cols, rng)
    raw = plain.data
    x8 = layouts.interleave(plain)
    x = rng.standard_normal(cols, dtype=np.float32)
    o1, o2 = np.empty(rows, np.float32), np.empty(rows, np.float32)
    n_copies = 0 if args.no_dram else max(64, -(-args.dram_mb * 10**6 // raw.nbytes))
    copies = [  # (plain, x8) pairs in distinct memory
        (QTensor(raw.copy(), qt, rows, cols), QTensor(x8.data.copy(), qt, rows, cols, interleave=8))
        for _ in range(n_copies)
    ]

    def plain_pass():
        for p, _ in copies:
            matvec(o1, p, x)

    def x8_pass():
        for _, q in copies:
            matvec(o2, q, x)

    runs = [("L3", 1, {"plain": lambda: matvec(o1, plain, x), "x8": lambda: matvec(o2, x8, x)})]
    if copies:
        runs.append(("DRAM", n_copies, {"plain": plain_pass, "x8": x8_pass}))
    for n_thr in threads:
        set_threads(n_thr)
        for where, n, fns in runs:
            res = alternate(fns, args.repeat)
            (tp, bp), (tx, bx) = ((m / n, b / n) for m, b in (res["plain"], res["x8"]))
            gb = raw.nbytes / 1e9
            print(
                f"{rows:5d}x{cols:<5d} {where:5s} {n_thr:3d} {tp * 1e6:9.1f} {gb / tp:6.1f} {gb / bp:6.1f} "
                f"{tx * 1e6:8.1f} {gb / tx:6.1f} {gb / bx:6.1f} {tp / tx:7.2f}x {bp / bx:6.2f}x",
                flush=True,
            )


def bench_matmul(rows: int, cols: int, n_tok: int, threads: list[int], args, rng) -> None:
    """Print plain vs x8 matmul GFLOP/s for `n_tok` tokens, per thread count."""
    qt = QT[args.type]
    plain = random_weight(qt, rows, cols, rng)
    x8 = layouts.interleave(plain)
    x = rng.standard_normal((n_tok, cols), dtype=np.float32)
    o1, o2 = np.empty((n_tok, rows), np.float32), np.empty((n_tok, rows), np.float32)
    fns = {"plain": lambda: matmul(o1, plain, x), "x8": lambda: matmul(o2, x8, x)}
    flop = 2 * rows * cols * n_tok
    for n_thr in threads:
        set_threads(n_thr)
        res = alternate(fns, args.repeat)
        (tp, bp), (tx, bx) = res["plain"], res["x8"]
        print(
            f"{rows:5d}x{cols:<5d} T={n_tok:<3d} {n_thr:3d} thr  GFLOP/s plain {flop / tp / 1e9:6.1f} "
            f"(best {flop / bp / 1e9:6.1f})  x8 {flop / tx / 1e9:6.1f} (best {flop / bx / 1e9:6.1f})  {tp / tx:5.2f}x",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.1f} (other processes skew shared-machine figures); repeat {args.repeat}")
    print("matvec: median µs and GB/s, best-run GB/s; speed-up of the medians and of the best runs")
    print(
        f"{'shape':>11s} {'where':5s} {'thr':>3s} {'plain µs':>9s} {'GB/s':>6s} {'best':>6s} "
        f"{'x8 µs':>8s} {'GB/s':>6s} {'best':>6s} {'median':>8s} {'best':>7s}"
    )
    for rows, cols in SHAPES:
        bench_matvec(rows, cols, threads, args, rng)
    for rows, cols in SHAPES:
        for n_tok in TOKENS:
            bench_matmul(rows, cols, n_tok, threads, args, rng)
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
