"""Soak test of `edgemoe serve`: many clients, good and hostile, for minutes, with optional disk faults.

    python tools/soak.py --minutes 3                         # the embedded model, memory-mapped experts
    python tools/soak.py --minutes 3 --stream-cache-mb 4     # experts streamed into a 4 MB cache
    python tools/soak.py --minutes 3 --faults --json r.json  # + EIO/short/slow read windows (LD_PRELOAD shim)

It starts its own server on a temporary UNIX socket and runs --clients threads until time is up. Each thread
sends, at random, a good request (completions or chat, streamed or not, temperature 0 or above), a bad one
(malformed JSON, unknown fields, an oversized body, lone surrogates, bad sampling values: each must get a 4xx),
or hangs up (mid-stream, before the reply, mid-body). Greedy replies are checked against the first reply to
the same prompt (one must be a prefix of the other). Every 2 s it samples the server's RSS, open file
descriptors and /health. With --faults the server runs under tests/faultshim.c and a thread opens short
fault windows on the model file, which the expert reader's retries (4 attempts, 5 + 10 + 20 ms apart) must
absorb. Exit code 0 only if no good request was lost, no bad one got a 5xx, the server stayed up, its RSS
stayed flat and its descriptors bounded, and SIGTERM stopped it cleanly.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the `tools.…` imports below, from any directory

from tools.serve_process import start  # noqa: E402
from tools.soak_clients import TIMEOUT_S, Tally, client, client_loop  # noqa: E402
from tools.soak_report import SAMPLE_S, summarise, table  # noqa: E402

DEFAULT_MODEL = REPO / "edgemoe" / "data" / "default-moe.gguf"
# A fault window must be shorter than the retry budget (the 4th attempt starts 5 + 10 + 20 = 35 ms after the
# first failure), else a read that fails as the window opens fails for good: that is a persistent fault.
FAULT_MS = (10, 30)


# --------------------------------------------------------------------------------------------- the server

def build_shim(d: Path) -> str | None:
    """tests/faultshim.c as a shared object in `d`, or None (no C compiler, or it does not build)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not sys.platform.startswith("linux"):
        return None
    out = d / "faultshim.so"
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(REPO / "tests" / "faultshim.c"), "-ldl"],
                       capture_output=True, text=True)
    return str(out) if r.returncode == 0 else None


def start_server(sock: str, log_path: Path, extra: list[str], env: dict) -> subprocess.Popen:
    """`python -m edgemoe serve --socket sock ...`, waited for until /health answers 200 (as the tests start it)."""
    return start(["--socket", sock, *extra], sock, log_path, env=env, cwd=REPO, timeout_s=300)


def scrape(sock: str) -> dict[str, float]:
    """The server's /metrics counters: every sample line as name → value."""
    with client(sock, 10) as c:
        text = c.get("/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(edgemoe_\S+)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


# ------------------------------------------------------------------------------------ sampling and faults

def sampler(proc: psutil.Process, sock: str, t0: float, stop: threading.Event, out: list, health: dict) -> None:
    """Every SAMPLE_S: (seconds since t0, RSS MB, open fds) into `out`; /health outcomes into `health`."""
    with client(sock, 10) as c:
        while True:
            try:
                out.append((time.monotonic() - t0, proc.memory_info().rss / 2**20, proc.num_fds()))
            except psutil.Error:
                health["process gone"] = health.get("process gone", 0) + 1
            try:
                r = c.get("/health")
                key = "ok" if r.status_code == 200 and r.json()["status"] == "ok" else f"status {r.status_code}"
                if key == "ok":
                    health["last"] = r.json()
            except (httpx.HTTPError, ValueError) as e:
                key = type(e).__name__
            health[key] = health.get(key, 0) + 1
            if stop.wait(SAMPLE_S):
                return


def faulter(ctl: Path, log: Path, size: int, every_s: float, eio_ms: tuple[int, int], rng: random.Random,
            stop: threading.Event, opened: list) -> None:
    """Open a fault window on every read of the model file every `every_s` s (the first after a third of it):
    EIO for `eio_ms` (10-30 ms by default; most often), or 1-3 short reads, or 2-8 reads delayed 5-50 ms;
    each cleared after a second.
    `opened` gets (rule, faults injected in that window)."""

    def write(text: str) -> None:
        tmp = ctl.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, ctl)  # the shim never sees half a file

    wait = every_s / 3
    while not stop.wait(wait):
        pick = rng.random()
        if pick < 0.6:
            rule = f"eio 0 {size} -1 {rng.randint(*eio_ms) * 1000}"
        elif pick < 0.8:
            rule = f"short 0 {size} {rng.randint(1, 3)}"
        else:
            rule = f"delay 0 {size} {rng.randint(2, 8)} {rng.randint(5, 50) * 1000}"
        before = sum(injected(log).values())
        write(rule + "\n")
        stop.wait(1.0)
        write("")
        opened.append((rule, sum(injected(log).values()) - before))
        wait = every_s - 1.0


def injected(log: Path) -> dict[str, int]:
    if not log.exists():
        return {}
    return dict(collections.Counter(line.split()[0] for line in log.read_text().splitlines() if line))


# ---------------------------------------------------------------------------------------------------- main

def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="edgemoe-soak-"))
    sock, log_path = str(work / "s.sock"), work / "server.log"
    model = Path(args.model) if args.model else DEFAULT_MODEL
    cache_mb = args.stream_cache_mb
    if args.faults and cache_mb is None:  # faults need streamed experts; a third of the file is less than they are
        cache_mb = max(1, model.stat().st_size // 3 >> 20)
    extra = (["-m", str(model)] if args.model else []) + ([] if cache_mb is None else ["--cache-mb", str(cache_mb)])
    env, ctl, fault_log = {}, work / "faults.ctl", work / "faults.log"
    if args.faults:
        shim = build_shim(work)
        if shim is None:
            raise RuntimeError("--faults: no C compiler could build tests/faultshim.c")
        ctl.write_text("")
        env = {"LD_PRELOAD": shim, "EDGEMOE_FAULT_FILE": str(model), "EDGEMOE_FAULT_CTL": str(ctl),
               "EDGEMOE_FAULT_LOG": str(fault_log)}
    print(f"starting the server ({' '.join(extra) or 'embedded model, memory-mapped'}) in {work}", file=sys.stderr)
    proc = start_server(sock, log_path, extra, env)
    ps = psutil.Process(proc.pid)
    tally, samples, health, opened = Tally(), [], {}, []
    stop = threading.Event()
    t0 = time.monotonic()
    duration = args.minutes * 60
    deadline = t0 + duration
    helpers = [threading.Thread(target=sampler, args=(ps, sock, t0, stop, samples, health), daemon=True)]
    if args.faults:
        every = min(args.fault_every, max(3.0, duration / 4))
        helpers.append(threading.Thread(target=faulter, daemon=True, args=(
            ctl, fault_log, model.stat().st_size, every, args.fault_ms, random.Random(args.seed + 999), stop, opened)))
    clients = [threading.Thread(target=client_loop, args=(sock, args.seed + i, deadline, tally), daemon=True)
               for i in range(args.clients)]
    for t in helpers + clients:
        t.start()
    print(f"{args.clients} clients for {duration:.0f} s", file=sys.stderr)
    for t in clients:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + TIMEOUT_S + 30)
    stuck = sum(t.is_alive() for t in clients)
    t_load = time.monotonic() - t0
    stop.set()
    for t in helpers:
        t.join(timeout=30)
    if args.faults:
        ctl.write_text("")

    settled = None  # idle connections close (keep-alive 5 s): the fds must come back down
    for _ in range(40):
        try:
            settled = ps.num_fds()
        except psutil.Error:
            break
        if samples and settled <= samples[0][2] + 8:
            break
        time.sleep(0.5)
    try:
        counters = {k: v for k, v in scrape(sock).items()
                    if re.search(r"retr|recover|fail|error|requests_total|expert", k)}
    except httpx.HTTPError:
        counters = {}
    alive = proc.poll() is None
    t_stop = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    text = log_path.read_text(errors="replace")
    server = {"alive_at_end": alive, "exit_code": code, "clean_exit": alive and code == 0,
              "stop_seconds": round(time.monotonic() - t_stop, 2), "log_lines": len(text.splitlines()),
              "tracebacks": text.count("Traceback"), "log": str(log_path), "clients_stuck": stuck}
    faults = None
    if args.faults:
        faults = {"windows": len(opened), "windows_hit": sum(n > 0 for _, n in opened),
                  "injected": injected(fault_log), "windows_detail": [f"{r} → {n}" for r, n in opened]}
    report = summarise(args, tally, samples, health, t_load, settled, faults, counters, server, cache_mb)
    report["samples"] = [[round(t, 1), round(m, 1), n] for t, m, n in samples]
    if report["pass"] and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="how long the clients run")
    p.add_argument("--clients", type=int, default=32, help="concurrent client threads (default 32)")
    p.add_argument("--model", help="GGUF/HF model (default: the embedded model)")
    p.add_argument("--stream-cache-mb", type=int, help="stream experts into a RAM cache of this many MB")
    p.add_argument("--faults", action="store_true", help="inject transient read faults (implies streamed experts; "
                   "default cache: a third of the model file)")
    p.add_argument("--fault-every", type=float, default=20.0, help="seconds between fault windows (default 20)")
    p.add_argument("--fault-ms", type=lambda v: tuple(int(x) for x in v.split(",")), default=FAULT_MS,
                   metavar="LO,HI", help="length of an EIO window in ms (default 10,30: within the 35 ms retry budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server log) after a pass")
    p.add_argument("--json", help="write the report here as JSON")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1:
        p.error("--minutes must be above 0 and --clients at least 1")
    try:
        report = run(args)
    except RuntimeError as e:  # the server did not start, or the fault shim did not build
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
