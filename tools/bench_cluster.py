"""The Ray Serve path (`edgemoe cluster up`) against `edgemoe serve` directly, on this machine.

    python tools/bench_cluster.py [-m MODEL] [--requests 40] [--rounds 5] [-n 256] [--streams 8] [--json OUT]

Three set-ups in turn, each on a temporary UNIX socket: `serve --threads C` (C = the cores), a cluster of one
replica with C CPUs, a cluster of two replicas with C/2 each (local Ray instance). For each:
- latency: --requests sequential non-streamed completions of one token (median ms); the cluster's overhead per
  request is its median minus serve's;
- one stream: --rounds streamed completions of -n tokens, tokens/s from the first token to the last (median);
- aggregate: --streams concurrent streamed completions of -n/2 tokens each, all tokens ÷ wall time (median of
  --rounds).
Last, Ray Serve's own cost per call: an empty deployment's round trip through a handle (median), through the
object store and over gRPC (as the front door calls). The client
runs on the same box (http.client, ~40 µs of CPU per token).
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
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.serve_process import _UnixConnection, start, stream_tokens  # noqa: E402

PROMPT = "The king said"


def one_token_ms(sock: str, requests: int) -> float:
    times = []
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    for _ in range(requests):
        c = _UnixConnection(sock)
        t = time.perf_counter()
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        times.append(time.perf_counter() - t)
        c.close()
        assert r.status == 200, r.status
    return 1e3 * statistics.median(times)


def stream_rate(sock: str, n: int, seed: int = 0) -> tuple[float, int]:
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    stamps = list(stream_tokens(sock, body))
    tokens = sum(k for _, k in stamps)
    if len(stamps) < 2:
        return 0.0, tokens
    return (tokens - stamps[0][1]) / (stamps[-1][0] - stamps[0][0]), tokens


def aggregate(sock: str, streams: int, n: int) -> float:
    def one(i):
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": n, "temperature": 0, "stream": True}
        return sum(k for _, k in stream_tokens(sock, body))

    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(streams)))
    return total / (time.perf_counter() - t)


def measure(sock: str, args) -> dict:
    stream_rate(sock, 16)  # warm: the first request of each path compiles nothing, but fills caches
    lat = one_token_ms(sock, args.requests)
    rates = [stream_rate(sock, args.n)[0] for _ in range(args.rounds)]
    aggs = [aggregate(sock, args.streams, args.n // 2) for _ in range(args.rounds)]
    return {"one_token_ms": round(lat, 2), "stream_tok_s": round(statistics.median(rates), 1),
            "aggregate_tok_s": round(statistics.median(aggs), 1)}


class _Empty:
    async def whole(self, item: dict) -> dict:
        return item


def ray_floor_ms(calls: int) -> dict:
    """Ray Serve's own cost of one call on this box: the median round trip through a handle to a deployment
    that does nothing (a local Ray instance of its own, with no proxy), through Ray's object store and over
    gRPC as the front door calls (edgemoe.cluster.deploy.direct)."""
    import asyncio

    import ray
    from ray import serve

    from edgemoe.cluster.deploy import direct

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(serve.deployment(_Empty).options(name="empty").bind(), name="empty", route_prefix=None)

        async def go(h) -> float:
            times = []
            for _ in range(calls + 10):
                t = time.perf_counter()
                await h.whole.remote({"method": "POST", "body": b"{}"})
                times.append(time.perf_counter() - t)
            return round(1e3 * statistics.median(times[10:]), 2)

        return {"object_store": asyncio.run(go(handle)), "grpc": asyncio.run(go(direct(handle)))}
    finally:
        serve.shutdown()
        ray.shutdown()


def cluster(root: str, model_args: list[str], replicas: int, cpus: int):
    env = {**os.environ, "XDG_RUNTIME_DIR": root}
    out = subprocess.run([sys.executable, "-m", "edgemoe", "cluster", "up", "--detach", "--replicas", str(replicas),
                          "--cpus-per-replica", str(cpus), *model_args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cluster up failed: {out.stderr.strip()}")
    return env, os.path.join(root, "edgemoe-cluster.sock")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="model file (default: the embedded model)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    model_args = ["-m", args.model] if args.model else []
    results = {}
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "serve.sock")
        proc = start([*model_args, "--socket", sock, "--threads", str(cores)], sock, os.path.join(d, "serve.log"))
        try:
            results["serve"] = measure(sock, args)
        finally:
            proc.terminate()
            proc.wait()
        print("serve:", results["serve"], flush=True)
        for replicas in (1, 2):
            root = tempfile.mkdtemp(dir=d)
            env, csock = cluster(root, model_args, replicas, max(1, cores // replicas))
            try:
                results[f"cluster_{replicas}"] = measure(csock, args)
            finally:
                subprocess.run([sys.executable, "-m", "edgemoe", "cluster", "down"], env=env, capture_output=True)
            print(f"cluster, {replicas} replica(s):", results[f"cluster_{replicas}"], flush=True)
    results["ray_floor_ms"] = ray_floor_ms(args.requests)
    print("Ray Serve's own call (an empty deployment), ms:", results["ray_floor_ms"], flush=True)
    s, c1, c2 = results["serve"], results["cluster_1"], results["cluster_2"]
    ratios = {"overhead_ms_per_request": round(c1["one_token_ms"] - s["one_token_ms"], 2),
              "stream_cluster1_vs_serve": round(c1["stream_tok_s"] / s["stream_tok_s"], 3),
              "aggregate_cluster1_vs_serve": round(c1["aggregate_tok_s"] / s["aggregate_tok_s"], 3),
              "aggregate_2_vs_1_replicas": round(c2["aggregate_tok_s"] / c1["aggregate_tok_s"], 3)}
    print(f"\n{'':24}{'1-token ms':>12}{'stream tok/s':>14}{'aggregate tok/s':>17}")
    for name, r in (("serve", s), ("cluster, 1 replica", c1), ("cluster, 2 replicas", c2)):
        print(f"{name:24}{r['one_token_ms']:>12.2f}{r['stream_tok_s']:>14.1f}{r['aggregate_tok_s']:>17.1f}")
    floor = results["ray_floor_ms"]
    print(f"\nRay path overhead per request: {ratios['overhead_ms_per_request']:+.2f} ms (Ray Serve's own call: "
          f"{floor['grpc']:.2f} ms over gRPC, {floor['object_store']:.2f} through the object store); one stream "
          f"{ratios['stream_cluster1_vs_serve']:.3f}x serve, {args.streams} streams "
          f"{ratios['aggregate_cluster1_vs_serve']:.3f}x; 2 replicas vs 1: {ratios['aggregate_2_vs_1_replicas']:.3f}x "
          f"({cores} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratios": ratios, "args": vars(args), "cores": cores}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
