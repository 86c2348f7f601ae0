"""The model's own batched pass: milliseconds per `Model.forward_batch` of B one-token rows (B sequences, each
with `--context` positions already cached), tokens/s against one row, in alternating rounds. With
`--compare-attention` each round also runs the old attention path (one `ops.attention` region per sequence
and layer) against the one-region kernel of kernels/attention_seqs.py.

    python tools/bench_batch.py MODEL.gguf --batches 1,2,4,8,16 --context 200 --rounds 5 [--compare-attention]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edgemoe.models.moe as moe_module  # noqa: E402
from edgemoe import kernels  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402


def time_passes(model, caches, passes: int) -> float:
    """Median seconds of `passes` one-token passes over `caches`; the caches are rewound after each."""
    lengths = [c.length for c in caches]
    times = []
    for r in range(passes):
        t = time.perf_counter()
        model.forward_batch([(np.array([5 + r]), c) for c in caches])
        times.append(time.perf_counter() - t)
        for c, n in zip(caches, lengths):
            c.length = n
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--context", type=int, default=200, help="positions cached in each sequence before the pass")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--passes", type=int, default=10, help="passes per batch size per round (their median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-attention", action="store_true")
    args = p.parse_args(argv)
    kernels.set_threads(args.threads)
    model = load_model(args.model).model
    sizes = [int(b) for b in args.batches.split(",")]
    prompt = np.arange(1, args.context + 1) % 200 + 3
    caches = [model.new_cache(args.context + 8) for _ in range(max(sizes))]
    for c in caches:
        model.forward(prompt, c)
    modes = ["one region", "per sequence"] if args.compare_attention else ["one region"]
    real = moe_module.KVLists.of
    results = {(b, m): [] for b in sizes for m in modes}
    for _ in range(args.rounds + 1):  # the first round warms up (compiles) and is dropped
        for b in sizes:
            for m in modes:
                moe_module.KVLists.of = real if m == "one region" else (lambda caches: None)
                results[b, m].append(time_passes(model, caches[:b], args.passes))
    moe_module.KVLists.of = real
    print(f"{os.path.basename(args.model)}: {args.threads} threads, {args.context} positions per sequence, "
          f"median of {args.rounds} rounds of {args.passes} passes")
    one = {m: statistics.median(results[sizes[0], m][1:]) for m in modes}
    for b in sizes:
        line = [f"B={b:3d}"]
        for m in modes:
            t = statistics.median(results[b, m][1:])
            line.append(f"{m}: {t * 1e3:7.2f} ms/pass, {b / t:7.1f} tok/s ({b / t / (sizes[0] / one[m]):4.2f}x B={sizes[0]})")
        if len(modes) == 2:
            ratio = statistics.median(results[b, modes[1]][1:]) / statistics.median(results[b, modes[0]][1:])
            line.append(f"per sequence / one region {ratio:.2f}")
        print("  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
