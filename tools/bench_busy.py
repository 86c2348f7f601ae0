"""Decode speed on a busy box: the default thread count against one thread, with a CPU burner pinned to a core.

    python tools/bench_busy.py [-m MODEL ...] [-n 48] [--runs 5] [--burn-core 1]

For each model, `edgemoe run -p "The king said" -n N --temp 0 --json` runs as a new process (as a user runs it),
alternating the default threads and `--threads 1`, first on a quiet box, then with a process spinning on core
`--burn-core` (taskset). Prints the medians of decode tok/s and the ratio default ÷ one thread in each case,
and writes them as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BURN = "while True: pass"


def run_once(model: str | None, n: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "edgemoe", "run", "-p", "The king said", "-n", str(n), "--temp", "0", "--json"]
    if model:
        cmd += ["-m", model]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    return {"decode_tok_s": data["timings"]["decode_tok_s"], "threads": data["threads"]}


def measure(model: str | None, n: int, runs: int, top: int) -> dict:
    default, one, all_cores, chosen = [], [], [], []
    for _ in range(runs):  # alternated: a drift of the box hits each alike
        d = run_once(model, n, None)
        default.append(d["decode_tok_s"])
        chosen.append(d["threads"])
        one.append(run_once(model, n, 1)["decode_tok_s"])
        all_cores.append(run_once(model, n, top)["decode_tok_s"])
    md, m1, mt = statistics.median(default), statistics.median(one), statistics.median(all_cores)
    return {"default_tok_s": round(md, 1), "one_thread_tok_s": round(m1, 1), "all_threads_tok_s": round(mt, 1),
            "ratio": round(md / m1, 3), "default_runs": default, "one_thread_runs": one, "all_threads_runs": all_cores,
            "threads": chosen[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", action="append", help="GGUF model (repeatable; default: the embedded model)")
    p.add_argument("-n", type=int, default=48, help="tokens to generate per run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--burn-core", type=int, default=1, help="the core the burner is pinned to")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    models = args.model or [None]
    top = len(os.sched_getaffinity(0))
    layer = os.environ.get("NUMBA_THREADING_LAYER", "default")
    print(f"{top} cores, Numba threading layer {layer}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    results = []
    for model in models:
        name = os.path.basename(model) if model else "default model"
        quiet = measure(model, args.n, args.runs, top)
        burner = subprocess.Popen(["taskset", "-c", str(args.burn_core), sys.executable, "-c", BURN])
        try:
            time.sleep(0.5)
            busy = measure(model, args.n, args.runs, top)
        finally:
            burner.kill()
            burner.wait()
        results.append({"model": name, "quiet": quiet, "busy": busy})
        for case, r in (("quiet", quiet), ("busy", busy)):
            print(f"{name:24s} {case:5s}  default {r['default_tok_s']:8.1f} tok/s   --threads 1 "
                  f"{r['one_thread_tok_s']:8.1f}   --threads {top} {r['all_threads_tok_s']:8.1f}   "
                  f"default / one thread {r['ratio']:.2f}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
