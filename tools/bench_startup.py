"""Start-up time of the README's main command, cold (an empty Numba cache, as after an install) and warm.

    python tools/bench_startup.py [--runs 3] [-m MODEL] [-n 48] [--serve]

Each cold run points NUMBA_CACHE_DIR at a new directory and times `edgemoe run -p "The king said" -n N
--temp 0` from start to exit, then waits for the background compile worker (compute.fused_compile:
background) and reports when it finished; the warm runs reuse the last cold run's cache. With --serve it
also times `edgemoe serve --config FILE` (as the systemd unit starts it) from start to the first answer of
/health, cold and warm. The same with compute.fused_compile=foreground (every kernel compiled before the
first step, the behaviour before the background worker) is one cold run per round. Medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "The king said"


def _run(cache: str, model: str | None, n: int, *extra: str) -> tuple[float, str, dict]:
    cmd = [sys.executable, "-m", "edgemoe", "run", "-p", PROMPT, "-n", str(n), "--temp", "0", "--json", *extra]
    if model:
        cmd += ["-m", model]
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"edgemoe run failed: {r.stderr.strip().splitlines()[-1:]}")
    return wall, r.stderr, json.loads(r.stdout)


def wait_for_exit(pid: int, timeout: float | None = None) -> bool:
    """Wait until process `pid` (not a child of ours) has exited; False if it still runs after `timeout` s."""
    end = None if timeout is None else time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except OSError:
            return True
        if end is not None and time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _worker_done(stderr: str, t_start: float) -> float | None:
    """Seconds from the run's start until its compile worker exited (None without one)."""
    if "(pid " not in stderr:
        return None
    wait_for_exit(int(stderr.split("(pid ")[1].split(",")[0]))
    return time.perf_counter() - t_start


def _wait_workers() -> None:
    """Until no compile worker runs (a stopped server's keeps compiling): none may overlap a timed start."""
    while True:
        busy = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    busy = busy or b"edgemoe.kernels.compile_ahead" in f.read()
            except OSError:
                pass
        if not busy:
            return
        time.sleep(0.2)


def _serve(cache: str, model: str | None, where: str) -> float:
    sock = os.path.join(where, "e.sock")
    cfg = os.path.join(where, "cfg.yaml")
    with open(cfg, "w") as f:
        f.write(f"server:\n  socket: {sock}\n" + (f"inference:\n  model: {model}\n" if model else ""))
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", "--config", cfg], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import http.client
        import socket

        while True:
            if p.poll() is not None:
                sys.exit("edgemoe serve exited before answering")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                conn = http.client.HTTPConnection("localhost")
                conn.sock = s
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.05)
    finally:
        p.terminate()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-m", "--model", default=None, help="a model file (default: the embedded model)")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--serve", action="store_true", help="also time `edgemoe serve --config` until /health answers")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="edgemoe-startup-")
    rows: dict[str, list[float]] = {k: [] for k in ("cold", "worker", "warm", "cold_fg", "serve_cold", "serve_warm")}
    speeds: dict[str, list[float]] = {"cold": [], "warm": []}
    try:
        for r in range(args.runs):
            _wait_workers()
            cache = os.path.join(root, f"cold{r}")
            t0 = time.perf_counter()
            wall, err, out = _run(cache, args.model, args.n)
            rows["cold"].append(wall)
            speeds["cold"].append(out["timings"]["decode_tok_s"])
            done = _worker_done(err, t0)
            if done is not None:
                rows["worker"].append(done)
            wall, _, out = _run(cache, args.model, args.n)
            rows["warm"].append(wall)
            speeds["warm"].append(out["timings"]["decode_tok_s"])
            wall, _, _ = _run(os.path.join(root, f"fg{r}"), args.model, args.n, "--set",
                              "compute.fused_compile=foreground")
            rows["cold_fg"].append(wall)
            if args.serve:
                where = os.path.join(root, f"serve{r}")
                os.makedirs(where)
                _wait_workers()
                rows["serve_cold"].append(_serve(os.path.join(root, f"scold{r}"), args.model, where))
                _wait_workers()
                rows["serve_warm"].append(_serve(cache, args.model, where))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items() if v), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    label = {"cold": "run, empty cache (fused kernels in the background)", "worker": "  ... background worker done after",
             "warm": "run, warm cache", "cold_fg": "run, empty cache, compute.fused_compile=foreground",
             "serve_cold": "serve --config until /health, empty cache", "serve_warm": "serve --config until /health, warm"}
    print(f"\nmedians of {args.runs} ({args.model or 'the embedded model'}, -n {args.n}):")
    for k, v in rows.items():
        if v:
            print(f"  {label[k]:55s} {statistics.median(v):6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in v)})")
    for k, v in speeds.items():
        if any(v):
            print(f"  decode tok/s, {k:4s}: {statistics.median(v):7.1f}")


if __name__ == "__main__":
    main()
