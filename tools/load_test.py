"""Load test for `edgemoe serve`: aggregate tokens/s and request latency p50/p99 at 1/4/8/16 concurrent streams.

    python tools/load_test.py --socket /run/edgemoe/edgemoe.sock
    python tools/load_test.py -m tiny.gguf          # starts a server on a temporary socket first
    python tools/load_test.py -m pack.gguf --serve-arg=--cache-mb=200   # an expert-streaming server

Each client streams completions back to back for --requests requests; latency is submit → last token.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np


def one_level(sock: str, clients: int, requests: int, max_tokens: int, prompt: str) -> dict:
    latencies, first_token, tokens = [], [], []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=600) as c:
            for _ in range(requests):
                t0 = time.perf_counter()
                t_first, n = None, 0
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
                with c.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        got = len(json.loads(line[6:])["choices"][0].get("token_ids", []))
                        if got and t_first is None:
                            t_first = time.perf_counter() - t0
                        n += got
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    first_token.append(t_first or 0.0)
                    tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    ttft = np.array(first_token)
    return {"clients": clients, "requests": len(lat), "tokens": int(sum(tokens)),
            "tok_s": round(sum(tokens) / wall, 2), "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3),
            "first_token_p50_s": round(float(np.percentile(ttft, 50)), 3)}


def start_server(model: str, sock: str, max_batch: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", "-m", model, "--socket", sock,
                             "--set", f"batching.max_batch={max_batch}", "--set", "batching.max_queue=64", *extra])
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe") as c:
                if c.get("/health").status_code == 200:
                    return proc
        except httpx.TransportError:
            time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="a running server's socket")
    p.add_argument("-m", "--model", help="start a server on this model instead")
    p.add_argument("--levels", default="1,4,8,16", help="concurrent streams to try (default 1,4,8,16)")
    p.add_argument("--requests", type=int, default=3, help="requests per client per level (default 3)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="with -m: the server's batching.max_batch")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="with -m: one more argument for edgemoe serve (repeat), e.g. --serve-arg=--cache-mb=200")
    p.add_argument("--json", action="store_true", help="one JSON object per level")
    args = p.parse_args()
    if not args.socket and not args.model:
        p.error("give --socket of a running server or -m MODEL to start one")
    proc = None
    tmp = tempfile.TemporaryDirectory()
    sock = args.socket or os.path.join(tmp.name, "edgemoe.sock")
    if args.model:
        proc = start_server(args.model, sock, args.max_batch, args.serve_arg)
    try:
        one_level(sock, 1, 1, 4, args.prompt)  # warm-up
        single = None
        for level in (int(x) for x in args.levels.split(",")):
            r = one_level(sock, level, args.requests, args.max_tokens, args.prompt)
            single = single or r["tok_s"]
            r["vs_1_stream"] = round(r["tok_s"] / single, 2) if single else None
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{level:3d} streams: {r['tok_s']:8.2f} tok/s total ({r['vs_1_stream']:.2f}x), "
                      f"latency p50 {r['latency_p50_s']:.3f} s "
                      f"p99 {r['latency_p99_s']:.3f} s, first token p50 {r['first_token_p50_s']:.3f} s "
                      f"({r['requests']} requests, {r['tokens']} tokens)")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
