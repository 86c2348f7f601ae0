"""Expert streaming benchmark: decode tokens/s, cache hit rate and disk GB/s at several cache budgets.

Synthesises (once) a random-weight model (or takes --model), measures the disk's own O_DIRECT read
bandwidth on that file in the same run (before, and after each round), then decodes with cache budgets of
10/25/50/100 % of the expert bytes and prefetch look-ahead depths (default 1 layer and off), the
configurations alternating round by round. Random weights have no routing locality, so these hit rates are
the worst case. Two bounds: "bound" is what the disk allows for the bytes actually read (misses and
prefetches), 1 / (bytes read per token ÷ disk bandwidth); "hit bound" is the disk+memory bound at the
measured hit rate, where only misses must come from disk (edgemoe.commands.bench.bound_tok_s). A figure
above 100 % means some reads were served faster than the measured cold bandwidth (host-side caching).

    python tools/bench_stream.py --preset mixtral-8x7b --scale 0.25 --layers 16
    python tools/bench_stream.py --model PACK --budgets 33 --temp 1.0 --depths 0,1,2,3 --repeat 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from edgemoe import kernels  # noqa: E402
from edgemoe.commands.bench import bound_tok_s  # noqa: E402
from edgemoe.doctor import model_sizes  # noqa: E402
from edgemoe.doctor_disk import LIMIT_THREADS, read_bandwidth  # noqa: E402
from edgemoe.engine.core import generate  # noqa: E402
from edgemoe.experts.setup import StreamOptions  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402
from edgemoe.membw import memory_read_gbs  # noqa: E402
from edgemoe.sampling import SamplingParams  # noqa: E402


def ensure_model(args) -> str:
    if args.model:
        return args.model
    path = os.path.join(args.dir, f"{args.preset}-s{args.scale}-l{args.layers}-{args.expert_quant}.gguf")
    if not os.path.exists(path):
        os.makedirs(args.dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(HERE, "synth_model.py"), args.preset, "-o", path, "--scale",
               str(args.scale), "--layers", str(args.layers), "--expert-quant", args.expert_quant, "--packed", "-q"]
        subprocess.run(cmd, check=True)
    return path


def expert_bytes(path: str) -> tuple[int, int, int, dict]:
    """(total expert bytes, bytes of one expert, active experts per token over all layers, model_sizes)."""
    loaded = load_model(path, StreamOptions.from_budget(1))
    ex = loaded.model.experts
    total = sum(e.nbytes for layer in ex.extents for e in layer)
    one = next(e.nbytes for layer in ex.extents for e in layer)
    a = loaded.args
    sizes = model_sizes(loaded)
    ex.close()
    return total, one, (a.num_hidden_layers - len(a.dense_layers)) * a.num_experts_per_tok, sizes


def run_once(path: str, budget_mb: float, depth: int, prompt: list[int], n: int, queue_depth: int,
             sampling: SamplingParams) -> dict:
    """One decode with prefetch `depth` layers ahead (0: off)."""
    opt = StreamOptions.from_budget(budget_mb, prefetch=depth > 0, prefetch_depth=max(depth, 1), queue_depth=queue_depth)
    loaded = load_model(path, opt)
    gen = generate(loaded.model, prompt, n, sampling, eos=False)
    st = loaded.model.experts.stats()
    loaded.model.experts.close()
    return {"decode_tok_s": gen.decode_tok_s, "prefill_tok_s": gen.prefill_tok_s, "hit_rate": st["cache"]["hit_rate"],
            "bytes_read": st["io"]["bytes_read"], "read_gb_s": st["io"]["gbps"], "p50_ms": st["io"]["p50_ms"],
            "p99_ms": st["io"]["p99_ms"], "tokens": len(prompt) + len(gen.tokens) - 1,
            "prefetch_used": st["prefetch"]["used_in_time"], "prefetch_issued": st["prefetch"]["issued"],
            "prefetch_late": st["prefetch"]["used_late"], "prefetch_wasted": st["prefetch"]["wasted"],
            "prefetch_accuracy": st["prefetch"]["accuracy"] or 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--expert-quant", default="Q4_0", choices=["Q4_0", "Q4_K"])
    p.add_argument("--dir", default="/tmp/edgemoe-bench")
    p.add_argument("--budgets", default="10,25,50,100", help="cache budgets, %% of expert bytes")
    p.add_argument("--depths", default="1,0", help="prefetch look-ahead depths to compare (layers ahead; 0 = off)")
    p.add_argument("--tokens", type=int, default=24, help="tokens to decode per run")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    p.add_argument("--repeat", type=int, default=2, help="runs per configuration (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queue-depth", type=int, default=4)
    p.add_argument("--temp", type=float, default=0.0,
                   help="sampling temperature (0 = greedy; > 0 samples with --seed, so routing varies token to token)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", default=None, help="an existing GGUF file or pack instead of the synthesised one")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    kernels.set_threads(args.threads)

    path = ensure_model(args)
    total, one, active, sizes = expert_bytes(path)
    disks = [read_bandwidth(path, seconds=2.0, threads=LIMIT_THREADS) / 1e9 for _ in range(3)]
    mem = memory_read_gbs()
    prompt = [int(x) for x in np.random.default_rng(0).integers(3, 200, args.prompt)]
    sampling = SamplingParams(temperature=args.temp, seed=args.seed)
    run_once(path, 1, 1, prompt[:2], 2, args.queue_depth, sampling)  # compile kernels, warm the dense pages
    depths = [int(d) for d in args.depths.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    runs = {(pct, d): [] for pct in budgets for d in depths}
    for _ in range(args.repeat):  # configurations alternate, so the disk's drift reaches each alike
        for pct in budgets:
            for depth in depths:
                budget_mb = total * pct / 100 / 2**20 * 1.02  # a little slack for alignment
                runs[pct, depth].append(run_once(path, budget_mb, depth, prompt, args.tokens, args.queue_depth, sampling))
        disks.append(read_bandwidth(path, seconds=1.0, threads=LIMIT_THREADS) / 1e9)
    disk = statistics.median(disks)
    rows = []
    for (pct, depth), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        read_per_tok = med["bytes_read"] / med["tokens"]  # misses and prefetches actually read
        bound = disk * 1e9 / read_per_tok if read_per_tok else float("inf")
        # The disk+memory bound at the measured hit rate: only misses must come from disk.
        hit_bound = bound_tok_s(sizes, mem * 1e9, disk * 1e9, med["hit_rate"])
        rows.append({"budget_pct": pct, "budget_mb": round(total * pct / 100 / 2**20 * 1.02), "prefetch": depth, **med,
                     "bound_tok_s": bound, "of_bound": med["decode_tok_s"] / bound if bound != float("inf") else None,
                     "hit_bound_tok_s": hit_bound, "of_hit_bound": med["decode_tok_s"] / hit_bound,
                     "wasted_mb_per_token": med["prefetch_wasted"] * one / 2**20 / med["tokens"]})
    info = {"model": path, "model_gb": os.path.getsize(path) / 1e9, "expert_gb": total / 1e9,
            "expert_mb": one / 2**20, "active_per_token": active, "disk_direct_gb_s": disk, "memory_gb_s": mem,
            "threads": args.threads, "temp": args.temp,
            "time": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}))
        return 0
    print(f"model {path}: {info['model_gb']:.2f} GB, experts {info['expert_gb']:.2f} GB "
          f"({info['expert_mb']:.1f} MB each, {active} active per token); "
          f"disk O_DIRECT {disk:.2f} GB/s (median of {len(disks)}), "
          f"memory {mem:.1f} GB/s; {'greedy' if args.temp == 0 else f'sampled at temperature {args.temp}'}")
    print(f"{'budget':>7} {'MB':>6} {'prefetch':>8} {'decode tok/s':>12} {'bound':>7} {'of bound':>8} {'hit rate':>8} "
          f"{'disk GB/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'hit bound':>9} {'of it':>6} {'pf acc':>6} {'wasted MB/tok':>13}")
    for r in rows:
        of = f"{r['of_bound']:.0%}" if r["of_bound"] is not None else "-"
        bound = f"{r['bound_tok_s']:.2f}" if r["bound_tok_s"] != float("inf") else "inf"
        print(f"{r['budget_pct']:>6.0f}% {r['budget_mb']:>6} {(str(r['prefetch']) if r['prefetch'] else 'off'):>8} "
              f"{r['decode_tok_s']:>12.2f} {bound:>7} {of:>8} {r['hit_rate']:>8.1%} {r['read_gb_s']:>9.2f} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['hit_bound_tok_s']:>9.2f} {r['of_hit_bound']:>6.0%} "
              f"{r['prefetch_accuracy']:>6.0%} {r['wasted_mb_per_token']:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
