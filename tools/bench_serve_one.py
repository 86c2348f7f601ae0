"""One stream through `edgemoe serve` against `edgemoe run`: decode tokens/s of the same greedy generation.

    python tools/bench_serve_one.py [-m MODEL] [-n 128] [--rounds 5] [--threads N] [--client http|httpx]

The server runs in its own process on a temporary UNIX socket (warmed up by one unmeasured request); each
round runs the generation once through `edgemoe run --json` (its own decode figure: first to last token) and
once as a streamed completion (temperature 0; both stop where the model stops), timed from the first streamed
token to the last, so both figures leave out the prompt. The ratio is the median over rounds
of each round's serve ÷ run. The client runs on the same box: with two cores its own CPU time per token takes
time from the model's threads, so `--client` says how light it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.serve_process import start, stream_tokens  # noqa: E402

PROMPT = "The king said"


def run_once(model: str | None, n: int, threads: int | None) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "edgemoe", "run", "-p", PROMPT, "-n", str(n), "--temp", "0", "--json"]
    cmd += ["-m", model] if model else []
    cmd += ["--threads", str(threads)] if threads else []
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    t = json.loads(r.stdout)["timings"]
    return t["decode_tok_s"], t["generated_tokens"]


def serve_once(sock: str, n: int, client: str = "http") -> tuple[float, int]:
    """Streamed tokens per second after the first chunk, and the tokens streamed."""
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    stamps = list(stream_tokens(sock, body, client))  # (time, tokens) per chunk
    tokens = sum(k for _, k in stamps)
    if tokens < 2 or len(stamps) < 2:
        raise SystemExit("the server streamed fewer than 2 tokens")
    return (tokens - stamps[0][1]) / (stamps[-1][0] - stamps[0][0]), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="a model file (default: the embedded model)")
    ap.add_argument("-n", type=int, default=128, help="tokens to generate (default 128)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="both: fixed thread count (default: the governor)")
    ap.add_argument("--client", choices=("http", "httpx"), default="http",
                    help="how the stream is read: the standard library's http.client (light) or httpx (as the "
                         "openai package; its own CPU use competes with the model's threads on a small box)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "e.sock")
        serve_args = ["--socket", sock] + (["-m", args.model] if args.model else [])
        serve_args += ["--threads", str(args.threads)] if args.threads else []
        proc = start(serve_args, sock, os.path.join(d, "serve.log"), timeout_s=600)
        try:
            serve_once(sock, args.n, args.client)  # warm-up: kernels, caches
            runs, serves, ratios = [], [], []
            for r in range(args.rounds):
                a, na = run_once(args.model, args.n, args.threads)
                b, nb = serve_once(sock, args.n, args.client)
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
          f"tok/s, serve / run {statistics.median(ratios):.2f}x ({args.client} client)")


if __name__ == "__main__":
    main()
