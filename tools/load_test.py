"""Load test for `edgemoe serve`: aggregate tokens/s and request latency p50/p99 at 1/4/8/16 concurrent streams.

    python tools/load_test.py --socket /run/edgemoe/edgemoe.sock
    python tools/load_test.py -m tiny.gguf          # starts a server on a temporary socket first
    python tools/load_test.py -m pack.gguf --serve-arg=--cache-mb=200   # an expert-streaming server

Each client (a thread of this process, reading with the standard library's http.client, niced to 19 by default
so that on a small box it takes the CPU the server leaves) streams completions back to back for --requests
requests; latency is submit → last token, as the niced client sees it.

For an expert-streaming server the level also reports, from the server's /metrics, the expert cache's hit rate
over the level, the MB of experts read from disk per generated token and the read rate over the level's wall
time; with -m, the disk's O_DIRECT sequential read rate over the model file is measured at the end (the server
stopped) and each level's tokens/s is compared with the disk bound it implies: that rate ÷ the bytes read per
token (the compute between reads left out, so no engine reaches it).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from edgemoe.engine.threads import describe  # noqa: E402
from tools.serve_process import start, stream_tokens  # noqa: E402


def one_level(sock: str, clients: int, requests: int, max_tokens: int, prompt: str) -> dict:
    latencies, first_token, tokens = [], [], []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            t_first, n = None, 0
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
            for t, got in stream_tokens(sock, body):
                if t_first is None:
                    t_first = t - t0
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


def expert_counters(sock: str) -> dict[str, float] | None:
    """The expert cache's counters from /metrics (None: the server does not stream experts)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe") as c:
        if not c.get("/health").json().get("engine", {}).get("streaming"):
            return None
        text = c.get("/metrics").text
    out = {}
    for line in text.splitlines():
        for key in ("hits", "misses", "bytes_read"):
            if line.startswith(f"edgemoe_expert_{'cache_' if key != 'bytes_read' else ''}{key}_total "):
                out[key] = float(line.split()[-1])
    return out if len(out) == 3 else None


def thread_choice(sock: str):
    """The server's thread counts: a fixed number, or the governor's status (passes per count, choice per size)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe") as c:
        return c.get("/health").json().get("engine", {}).get("threads")


def start_server(model: str, sock: str, max_batch: int | None, extra: list[str]) -> subprocess.Popen:
    # any --set makes a configured server, which streams its experts (as `serve --config` does)
    sets = ["--set", f"batching.max_batch={max_batch}", "--set", "batching.max_queue=64"] if max_batch else []
    return start(["-m", model, "--socket", sock, *sets, *extra], sock, sock + ".log", timeout_s=600)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="a running server's socket")
    p.add_argument("-m", "--model", help="start a server on this model instead")
    p.add_argument("--levels", default="1,4,8,16", help="concurrent streams to try (default 1,4,8,16)")
    p.add_argument("--requests", type=int, default=3, help="requests per client per level (default 3)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=None,
                   help="with -m: the server's batching.max_batch (default: the server's own, 8); set, it is passed "
                        "with --set, and a configured server streams its experts (default cache tiers, 4 GB)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="with -m: one more argument for edgemoe serve (repeat), e.g. --serve-arg=--cache-mb=200")
    p.add_argument("--json", action="store_true", help="one JSON object per level")
    p.add_argument("--client-nice", type=int, default=19, metavar="N",
                   help="the clients' niceness (default 19: on a small box they take the CPU only when the server "
                        "leaves it, so the figures measure the server; 0 competes with it as a local client would)")
    args = p.parse_args()
    if not args.socket and not args.model:
        p.error("give --socket of a running server or -m MODEL to start one")
    proc = None
    tmp = tempfile.TemporaryDirectory()
    sock = args.socket or os.path.join(tmp.name, "edgemoe.sock")
    if args.model:
        proc = start_server(args.model, sock, args.max_batch, args.serve_arg)
    os.nice(args.client_nice)  # after the server started: it keeps its own niceness
    try:
        one_level(sock, 1, 1, 4, args.prompt)  # warm-up
        single = None
        results = []
        for level in (int(x) for x in args.levels.split(",")):
            before, t0 = expert_counters(sock), time.perf_counter()
            r = one_level(sock, level, args.requests, args.max_tokens, args.prompt)
            after, wall = expert_counters(sock), time.perf_counter() - t0
            single = single or r["tok_s"]
            r["vs_1_stream"] = round(r["tok_s"] / single, 2) if single else None
            if before is not None and after is not None:
                d = {k: after[k] - before[k] for k in after}
                r["hit_rate"] = round(d["hits"] / max(1.0, d["hits"] + d["misses"]), 3)
                r["mb_read_per_token"] = round(d["bytes_read"] / max(1, r["tokens"]) / 1e6, 2)
                r["read_gbs"] = round(d["bytes_read"] / wall / 1e9, 3)
            r["threads"] = thread_choice(sock)
            results.append(r)
            if not args.json:
                extra = (f"; hit rate {r['hit_rate']:.2f}, {r['mb_read_per_token']:.1f} MB read per token, "
                         f"{r['read_gbs']:.2f} GB/s" if "hit_rate" in r else "")
                if isinstance(r["threads"], dict):
                    extra += f"; threads {describe(r['threads'])}, passes per count {r['threads'].get('passes')}"
                print(f"{level:3d} streams: {r['tok_s']:8.2f} tok/s total ({r['vs_1_stream']:.2f}x), "
                      f"latency p50 {r['latency_p50_s']:.3f} s "
                      f"p99 {r['latency_p99_s']:.3f} s, first token p50 {r['first_token_p50_s']:.3f} s "
                      f"({r['requests']} requests, {r['tokens']} tokens){extra}", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        tmp.cleanup()
    if args.model and any(r.get("mb_read_per_token") for r in results):
        from tools.bench_disk import measure_direct_read_gbs

        disk = measure_direct_read_gbs(args.model, seconds=3.0)
        if not args.json:
            print(f"disk: {disk:.2f} GB/s O_DIRECT sequential over {os.path.basename(args.model)} (server stopped)")
        for r in results:
            if r.get("mb_read_per_token"):
                r["disk_gbs"] = round(disk, 3)
                r["disk_bound_tok_s"] = round(disk * 1e3 / r["mb_read_per_token"], 2)
                r["of_disk_bound"] = round(r["tok_s"] / r["disk_bound_tok_s"], 2)
                if not args.json:
                    print(f"{r['clients']:3d} streams: disk bound {r['disk_bound_tok_s']:.1f} tok/s "
                          f"({r['mb_read_per_token']:.1f} MB per token), measured {r['of_disk_bound']:.0%} of it")
    if args.json:
        for r in results:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
