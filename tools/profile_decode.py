"""Where a decode step's time goes: each matrix shape, each non-matrix kernel, and the Python between them.

    python tools/profile_decode.py MODEL.gguf [--context 128] [--tokens 64] [--threads 2]

Runs a prompt of --context tokens, then times --tokens decode steps, wrapping every `linear` call (by weight
type, layout and shape), every kernel in `edgemoe.kernels.ops` and the fused attention and expert blocks
(`edgemoe.kernels.fused`, one call per layer each) with a timer. What is left of the step's wall time is
Python/NumPy work between kernels. Per-call timers add ~1 µs each; the total is measured too.
--separate turns the fused blocks off, to see the kernel-by-kernel split of the same step.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgemoe.kernels.fused as fused  # noqa: E402
import edgemoe.models.base as base  # noqa: E402
import edgemoe.models.moe as moe  # noqa: E402
from edgemoe.kernels import ops, set_threads  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402

OPS = ("attention", "silu_mul", "swiglu_halves", "rmsnorm", "rope_inplace", "route_topk")


def timed(fn, key, seconds: dict, calls: dict):
    """`fn` adding its wall time and one call to seconds[key] / calls[key] (key may be a function of the args)."""

    def wrapper(*a):
        t0 = time.perf_counter()
        y = fn(*a)
        k = key(*a) if callable(key) else key
        seconds[k] += time.perf_counter() - t0
        calls[k] += 1
        return y

    return wrapper


def instrument(seconds: dict, calls: dict) -> None:
    """Replace base.linear, the ops kernels and the fused blocks by timed wrappers that add into seconds/calls."""
    linear = timed(base.linear, lambda x, w: f"matrix {w.qtype.name}{' x8' if w.interleave == 8 else ''} {w.rows}x{w.cols}",
                   seconds, calls)
    base.linear = moe.linear = linear
    for name in OPS:
        setattr(ops, name, timed(getattr(ops, name), name, seconds, calls))
    for name in ("attention_block", "moe_block"):
        setattr(fused, name, timed(getattr(fused, name), f"fused {name}", seconds, calls))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before decoding (default 128)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--separate", action="store_true", help="run each kernel separately (no fused blocks)")
    args = p.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # piped into head: stop quietly
    set_threads(args.threads)
    seconds: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    instrument(seconds, calls)
    m = load_model(args.model).model
    m.fused = not args.separate
    vocab = m.args.vocab_size
    cache = m.new_cache(args.context + args.tokens + 1)
    logits = m.forward(np.arange(args.context) % (vocab - 1) + 1, cache)
    tok = int(logits[-1].argmax())
    seconds.clear()
    calls.clear()
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        tok = int(m.forward(np.asarray([tok]), cache)[-1].argmax())
    total = (time.perf_counter() - t0) / args.tokens * 1e3
    print(f"{args.model}: {total:.2f} ms per decode token ({1e3 / total:.1f} tok/s), context {args.context}, "
          f"{args.threads} threads")
    timed = 0.0
    for key, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        ms = s / args.tokens * 1e3
        timed += ms
        print(f"  {ms:7.3f} ms {100 * ms / total:5.1f} %  {calls[key] // args.tokens:3d} calls  {key}")
    print(f"  {total - timed:7.3f} ms {100 * (total - timed) / total:5.1f} %   Python/NumPy between kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
