"""edgemoe against llama.cpp on the same GGUF file: same prompt ids, same number of tokens, same threads.

Runs both engines alternately (each run a fresh process), prints medians and the ratio edgemoe / llama.cpp
for prompt processing and decode, next to the decode bound measured in the same run (bytes a decode step
reads ÷ memory bandwidth; when streaming, + expert bytes read from disk ÷ measured O_DIRECT bandwidth).

    pip install '.[bench]'      # llama-cpp-python (compiles llama.cpp from source: ~5 minutes)
    python tools/compare_llamacpp.py MODEL.gguf --prompt 512 --decode 128 --repeat 3
    python tools/compare_llamacpp.py MODEL.gguf --memory-limit-mb 600 --cache-mb 250   # larger than RAM

Larger than RAM: both engines run inside one cgroup-v1 memory group limited to --memory-limit-mb (root
needed), the page cache is dropped before each run; llama.cpp uses its default mmap with --no-repack (its
CPU repacking copies Q4_0/Q4_K weights into anonymous memory, which a memory limit below the model size
turns into an OOM kill), edgemoe streams experts through a --cache-mb cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CGROUP = "/sys/fs/cgroup/memory/edgemoe-compare"

LLAMA_WORKER = r"""
import json, sys, time
import llama_cpp
path, threads, ids, n = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
if sys.argv[5] == "no-repack":  # llama.cpp's --no-repack: keep weights in the mmap instead of copying them to RAM
    import llama_cpp.llama_cpp as C
    _default = C.llama_model_default_params
    def _params():
        p = _default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = _params
llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + n + 8, n_threads=threads, n_threads_batch=threads,
                      n_batch=512, verbose=False)
llama_cpp.llama_perf_context_reset(llm.ctx)
out = []
for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, reset=True):
    out.append(int(tok))
    if len(out) == n:
        break
p = llama_cpp.llama_perf_context(llm.ctx)
print(json.dumps({"prefill_tok_s": p.n_p_eval / (p.t_p_eval_ms / 1e3), "decode_tok_s": p.n_eval / (p.t_eval_ms / 1e3),
                  "token_ids": out}))
"""


def in_cgroup(limit: int | None):
    if limit is None:
        return None

    def enter():
        with open(os.path.join(CGROUP, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    return enter


def drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def run_llama(path, threads, ids, n, limit):
    mode = "no-repack" if limit else "default"
    r = subprocess.run([sys.executable, "-c", LLAMA_WORKER, path, str(threads), ",".join(map(str, ids)), str(n), mode],
                       capture_output=True, text=True, preexec_fn=in_cgroup(limit), timeout=3600)
    if r.returncode:
        raise SystemExit(f"llama.cpp run failed ({r.returncode}): {r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_edgemoe(path, threads, ids, n, limit, cache_mb):
    cmd = [sys.executable, "-m", "edgemoe", "run", "-m", path, "--prompt-ids", ",".join(map(str, ids)), "-n", str(n),
           "--temp", "0", "--threads", str(threads), "--json", "--ctx", str(len(ids) + n + 8)]
    if cache_mb is not None:
        cmd += ["--cache-mb", str(cache_mb)]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=in_cgroup(limit), timeout=3600,
                       cwd=os.path.dirname(HERE))
    if r.returncode:
        raise SystemExit(f"edgemoe run failed ({r.returncode}): {r.stderr[-1500:]}")
    d = json.loads(r.stdout)
    return {"prefill_tok_s": d["timings"]["prefill_tok_s"], "decode_tok_s": d["timings"]["decode_tok_s"],
            "token_ids": d["token_ids"], "cache": d.get("cache"), "io": d.get("io")}


def bounds(path, mem_gbs, disk_gbs, edgemoe_runs, ids, n):
    from edgemoe.commands.bench import bound_tok_s
    from edgemoe.doctor import model_sizes
    from edgemoe.loader import load_model

    sizes = model_sizes(load_model(path))
    out = {"in_ram_tok_s": bound_tok_s(sizes, mem_gbs * 1e9), "sizes": sizes}
    if disk_gbs and edgemoe_runs[0].get("cache"):
        hit = statistics.median(r["cache"]["hit_rate"] for r in edgemoe_runs)
        out["streaming_tok_s"] = bound_tok_s(sizes, mem_gbs * 1e9, disk_gbs * 1e9, hit)
        out["hit_rate"] = hit
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--decode", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--llama-decode", type=int, default=None,
                   help="llama.cpp's generated tokens if fewer (default: --decode; under a tight memory limit "
                        "llama.cpp takes seconds per token)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--memory-limit-mb", type=int, default=None, help="run both engines in a memory cgroup")
    p.add_argument("--cache-mb", type=float, default=None, help="edgemoe's expert cache (streaming)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import numpy as np

    from edgemoe.doctor_disk import LIMIT_THREADS, read_bandwidth
    from edgemoe.membw import memory_read_gbs

    limit = args.memory_limit_mb * 2**20 if args.memory_limit_mb else None
    if limit:
        os.makedirs(CGROUP, exist_ok=True)
        with open(os.path.join(CGROUP, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    from edgemoe.loader import load_model

    vocab = load_model(args.model).args.vocab_size
    ids = [1] + [int(t) for t in np.random.default_rng(0).integers(3, vocab, args.prompt - 1)]
    mem_gbs = memory_read_gbs()
    disk_gbs = read_bandwidth(args.model, seconds=2.0, threads=LIMIT_THREADS) / 1e9 if args.cache_mb is not None else None
    ours, theirs = [], []
    load_before = os.getloadavg()  # other work on the box skews both engines: recorded with the result
    for r in range(args.repeat):
        for engine in (("edgemoe", "llama") if r % 2 == 0 else ("llama", "edgemoe")):
            if limit:
                drop_caches()
            if engine == "edgemoe":
                ours.append(run_edgemoe(args.model, args.threads, ids, args.decode, limit, args.cache_mb))
            else:
                theirs.append(run_llama(args.model, args.threads, ids, args.llama_decode or args.decode, limit))
            last = (ours if engine == "edgemoe" else theirs)[-1]
            print(f"run {r + 1}/{args.repeat} {engine}: prefill {last['prefill_tok_s']:.1f} "
                  f"decode {last['decode_tok_s']:.2f} tok/s", file=sys.stderr)
    if limit:
        os.rmdir(CGROUP)
    b = bounds(args.model, mem_gbs, disk_gbs, ours, ids, args.decode)
    med = {f"{who}_{k}": statistics.median(x[k] for x in runs)
           for who, runs in (("edgemoe", ours), ("llamacpp", theirs)) for k in ("prefill_tok_s", "decode_tok_s")}
    n_both = min(args.decode, args.llama_decode or args.decode)
    same = next((i for i, (a, b_) in enumerate(zip(ours[0]["token_ids"], theirs[0]["token_ids"])) if a != b_),
                n_both)  # greedy tokens identical before the first difference
    result = {"model": args.model, "model_gb": os.path.getsize(args.model) / 1e9, "threads": args.threads,
              "prompt": args.prompt, "decode": args.decode, "llamacpp_decode": args.llama_decode or args.decode,
              "repeat": args.repeat,
              "memory_limit_mb": args.memory_limit_mb, "cache_mb": args.cache_mb, **med,
              "prefill_ratio": med["edgemoe_prefill_tok_s"] / med["llamacpp_prefill_tok_s"],
              "decode_ratio": med["edgemoe_decode_tok_s"] / med["llamacpp_decode_tok_s"],
              "memory_read_gb_s": mem_gbs, "disk_read_gb_s": disk_gbs,
              "bound_tok_s": b.get("streaming_tok_s", b["in_ram_tok_s"]), "hit_rate": b.get("hit_rate"),
              "greedy_prefix_identical": f"{same}/{n_both}", "time": time.strftime("%Y-%m-%d %H:%M"),
              "runs": {who: [{k: x[k] for k in ("prefill_tok_s", "decode_tok_s", "cache", "io") if k in x} for x in runs]
                       for who, runs in (("edgemoe", ours), ("llamacpp", theirs))},
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    result["edgemoe_of_bound"] = med["edgemoe_decode_tok_s"] / result["bound_tok_s"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model} ({result['model_gb']:.2f} GB), {args.threads} threads, prompt {args.prompt}, decode "
          f"{args.decode}, median of {args.repeat}" + (f", cgroup limit {args.memory_limit_mb} MB" if limit else ""))
    print(f"{'':10} {'edgemoe':>10} {'llama.cpp':>10} {'ratio':>7}")
    print(f"{'prefill':10} {med['edgemoe_prefill_tok_s']:>10.1f} {med['llamacpp_prefill_tok_s']:>10.1f} "
          f"{result['prefill_ratio']:>6.2f}x")
    print(f"{'decode':10} {med['edgemoe_decode_tok_s']:>10.2f} {med['llamacpp_decode_tok_s']:>10.2f} "
          f"{result['decode_ratio']:>6.2f}x")
    print(f"decode bound {result['bound_tok_s']:.1f} tok/s (memory {mem_gbs:.1f} GB/s"
          + (f", disk {disk_gbs:.2f} GB/s, hit rate {b['hit_rate']:.1%}" if disk_gbs else "")
          + f"): edgemoe at {result['edgemoe_of_bound']:.0%}; identical greedy prefix {result['greedy_prefix_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
