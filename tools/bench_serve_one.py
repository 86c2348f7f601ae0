"""One stream through `edgemoe serve` against `edgemoe run`: decode tokens/s of the same greedy generation.

    python tools/bench_serve_one.py [-m MODEL] [-n 128] [--rounds 5] [--threads N]

The server runs in its own process on a temporary UNIX socket (warmed up by one unmeasured request); each
round runs the generation once through `edgemoe run --json` (its own decode figure: first to last token) and
once as a streamed completion (temperature 0; both stop where the model stops), timed from the first streamed
token to the last, so both figures leave out the prompt. The ratio is the median over rounds
of each round's serve ÷ run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.serve_process import start  # noqa: E402

PROMPT = "The king said"


def run_once(model: str | None, n: int, threads: int | None) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "edgemoe", "run", "-p", PROMPT, "-n", str(n), "--temp", "0", "--json"]
    cmd += ["-m", model] if model else []
    cmd += ["--threads", str(threads)] if threads else []
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    t = json.loads(r.stdout)["timings"]
    return t["decode_tok_s"], t["generated_tokens"]


def serve_once(sock: str, n: int) -> tuple[float, int]:
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    stamps = []
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=600) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:])["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise SystemExit("the server streamed fewer than 2 tokens")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="a model file (default: the embedded model)")
    ap.add_argument("-n", type=int, default=128, help="tokens to generate (default 128)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="both: fixed thread count (default: the governor)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "e.sock")
        serve_args = ["--socket", sock] + (["-m", args.model] if args.model else [])
        serve_args += ["--threads", str(args.threads)] if args.threads else []
        proc = start(serve_args, sock, os.path.join(d, "serve.log"), timeout_s=600)
        try:
            serve_once(sock, args.n)  # warm-up: kernels, caches
            runs, serves, ratios = [], [], []
            for r in range(args.rounds):
                a, na = run_once(args.model, args.n, args.threads)
                b, nb = serve_once(sock, args.n)
                runs.append(a)
                serves.append(b)
                ratios.append(b / a)
                print(f"round {r + 1}: run {a:8.1f} tok/s ({na} tokens), serve {b:8.1f} tok/s ({nb} streamed), "
                      f"{b / a:.2f}x", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    print(f"\nmedians of {args.rounds} ({args.model or 'the embedded model'}, -n {args.n}, threads "
          f"{args.threads or 'auto'}): run {statistics.median(runs):.1f} tok/s, serve {statistics.median(serves):.1f} "
          f"tok/s, serve / run {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
