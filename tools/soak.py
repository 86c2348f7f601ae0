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
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "edgemoe" / "data" / "default-moe.gguf"
TIMEOUT_S = 120.0  # one good request, queueing included; longer counts as lost
SAMPLE_S = 2.0  # RSS / fds / health sampling period
FLAT = 0.10  # RSS may grow less than this over the run's second half
# A fault window must be shorter than the retry budget (the 4th attempt starts 5 + 10 + 20 = 35 ms after the
# first failure), else a read that fails as the window opens fails for good: that is a persistent fault.
FAULT_MS = (10, 30)

PROMPTS = ["KING HENRY.\n", "ROMEO.\nO", "To be, or not to be", "First Citizen.\n", "HAMLET.\nMy lord,",
           "Enter the King", "What news, my lord?", "The king is", "JULIET.\n", "Good morrow, sweet",
           "O, what a", "PORTIA.\nThe quality of mercy"]

# (kind, method, path, raw body): every one must be answered 4xx.
BAD = [
    ("malformed_json", "POST", "/v1/completions", b'{"prompt": "KING", "max_tokens": 4'),
    ("not_json", "POST", "/v1/chat/completions", b"hello there"),
    ("unknown_field", "POST", "/v1/completions", b'{"prompt": "KING", "max_tokens": 4, "bogus": 1}'),
    ("unknown_message_field", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi", "name2": 1}]}'),
    ("lone_surrogate", "POST", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}'),
    ("lone_surrogate_chat", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}'),
    ("temperature_negative", "POST", "/v1/completions", b'{"prompt": "x", "temperature": -1}'),
    ("temperature_nan", "POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}'),
    ("temperature_huge", "POST", "/v1/completions", b'{"prompt": "x", "temperature": 1e300}'),
    ("top_p_zero", "POST", "/v1/completions", b'{"prompt": "x", "top_p": 0}'),
    ("max_tokens_string", "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "4"}'),
    ("max_tokens_zero", "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 0}'),
    ("max_tokens_past_ctx", "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1000000}'),
    ("seed_overflow", "POST", "/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}'),
    ("stream_not_bool", "POST", "/v1/completions", b'{"prompt": "x", "stream": "yes"}'),
    ("empty_stop", "POST", "/v1/completions", b'{"prompt": "x", "stop": [""]}'),
    ("token_out_of_vocab", "POST", "/v1/completions", b'{"prompt": [1, 10000000]}'),
    ("prompt_past_ctx", "POST", "/v1/completions", json.dumps({"prompt": [1] * 5000}).encode()),
    ("deep_json", "POST", "/v1/completions", b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("chat_content_int", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}'),
    ("no_prompt", "POST", "/v1/completions", b'{"max_tokens": 3}'),
    ("wrong_method", "GET", "/v1/completions", b""),
    ("unknown_path", "POST", "/v1/nothing", b"{}"),
    ("oversized_body", "POST", "/v1/completions", b""),  # sent by hand: 9 MiB on a raw socket
]
OVERSIZED = 9 << 20  # past the server's 8 MiB body limit
MIX = (("good", 0.75), ("bad", 0.15), ("disconnect", 0.10))


class Malformed(Exception):
    """A good request's reply that is not what it should be (the message says how)."""


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile, None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


class Tally:
    """Everything the client threads count, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.good = collections.Counter()  # sent, ok, lost, greedy_checked, mismatch
        self.lost_reasons = collections.Counter()
        self.examples: list[str] = []  # the first few failures, in full
        self.bad = collections.defaultdict(collections.Counter)  # kind → status → n
        self.disconnects = collections.Counter()
        self.whole_s: list[float] = []
        self.ttft_s: list[float] = []
        self.stream_s: list[float] = []
        self.tokens = 0
        self.greedy: dict[tuple[bool, int], list[int]] = {}  # (chat, prompt) → the longest greedy ids seen

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)

    def lost(self, reason: str, detail: str) -> None:
        with self.lock:
            self.good["lost"] += 1
            self.lost_reasons[reason] += 1
            self.note(f"lost: {detail}")

    def ok(self, key: tuple[bool, int] | None, ids: list[int], n_tokens: int) -> None:
        with self.lock:
            self.good["ok"] += 1
            self.tokens += n_tokens
            if key is None:
                return
            seen = self.greedy.get(key)
            if seen is None:
                self.greedy[key] = ids
                return
            self.good["greedy_checked"] += 1
            short, long = (ids, seen) if len(ids) <= len(seen) else (seen, ids)
            if long[:len(short)] != short:
                self.good["mismatch"] += 1
                self.note(f"greedy mismatch for {'chat' if key[0] else 'completion'} {PROMPTS[key[1]]!r}: "
                          f"{seen} vs {ids}")
            elif len(ids) > len(seen):
                self.greedy[key] = ids


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
    """`python -m edgemoe serve --socket sock ...`, waited for until /health answers 200 (as tests/test_faults.py)."""
    log = open(log_path, "w+")  # a file, not a pipe: a chatty server never blocks
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", "--socket", sock, *extra],
                            env={**os.environ, **env}, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 300  # a cold Numba cache compiles the kernels first
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-3000:]}")
        try:
            with client(sock, 5) as c:
                if c.get("/health").status_code == 200:
                    return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not come up in 300 s")


def client(sock: str, timeout: float = TIMEOUT_S) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=timeout)


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


# ------------------------------------------------------------------------------------------------ clients

def raw(sock: str, data: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock)
    s.sendall(data)
    return s


def head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: edgemoe\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def good(c: httpx.Client, rng: random.Random, tally: Tally) -> None:
    chat, stream, greedy = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5
    i, n = rng.randrange(len(PROMPTS)), rng.choice((8, 16, 24, 32))
    body: dict = {"max_tokens": n, "temperature": 0 if greedy else round(rng.uniform(0.5, 1.2), 2)}
    if not greedy and rng.random() < 0.5:
        body.update(top_p=0.9, seed=rng.randrange(1 << 31))
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPTS[i]}]
    else:
        body["prompt"] = PROMPTS[i]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    what = f"{'streamed ' if stream else ''}{path} {body}"
    with tally.lock:
        tally.good["sent"] += 1
    t0 = time.perf_counter()
    try:
        if stream:
            ids, ttft = _streamed(c, path, body, chat, n)
        else:
            ids, ttft = _whole(c, path, body, chat, n), None
    except Malformed as e:
        tally.lost(str(e).split(":")[0], f"{what}: {e}")
        return
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        tally.lost(type(e).__name__, f"{what}: {e!r}")
        return
    total = time.perf_counter() - t0
    with tally.lock:
        (tally.stream_s if stream else tally.whole_s).append(total)
        if ttft is not None:
            tally.ttft_s.append(ttft)
    tally.ok((chat, i) if greedy else None, ids, len(ids))


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Malformed(what)


def _whole(c: httpx.Client, path: str, body: dict, chat: bool, n: int) -> list[int]:
    r = c.post(path, json=body)
    _check(r.status_code == 200, f"status {r.status_code}: {r.text[:200]}")
    b = r.json()
    ch = b["choices"][0]
    text = ch["message"]["content"] if chat else ch["text"]
    _check(b["object"] == ("chat.completion" if chat else "text_completion"), f"malformed: object {b['object']}")
    _check(isinstance(text, str), "malformed: text is not a string")
    _check(ch["finish_reason"] in ("length", "stop"), f"malformed: finish_reason {ch['finish_reason']}")
    got = b["usage"]["completion_tokens"]
    _check(got == len(ch["token_ids"]) and 1 <= got <= n and (got == n or ch["finish_reason"] == "stop"),
           f"malformed: {got} tokens for max_tokens {n}, finish_reason {ch['finish_reason']}")
    return ch["token_ids"]


def _streamed(c: httpx.Client, path: str, body: dict, chat: bool, n: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    ids: list[int] = []
    ttft = finish = usage = None
    done = False
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise Malformed(f"status {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            _check("error" not in ev, f"error event: {str(ev.get('error'))[:200]}")
            ch = ev["choices"][0]
            _check(isinstance(ch["delta"].get("content", "") if chat else ch["text"], str), "malformed: chunk text")
            if ch["token_ids"] and ttft is None:
                ttft = time.perf_counter() - t0
            ids += ch["token_ids"]
            finish = ch["finish_reason"] or finish
            usage = ev.get("usage") or usage
    _check(done, "truncated: stream ended without [DONE]")
    _check(finish in ("length", "stop") and usage is not None, f"malformed: last chunk {finish}, usage {usage}")
    _check(usage["completion_tokens"] == len(ids) and 1 <= len(ids) <= n and (len(ids) == n or finish == "stop"),
           f"malformed: {len(ids)} tokens streamed, usage {usage}, max_tokens {n}")
    return ids, ttft


def bad(c: httpx.Client, sock: str, rng: random.Random, tally: Tally) -> None:
    kind, method, path, data = rng.choice(BAD)
    try:
        if kind == "oversized_body":
            status = _oversized(sock, path)
        else:
            status = c.request(method, path, content=data, headers={"content-type": "application/json"}).status_code
        key = str(status)
    except (httpx.HTTPError, OSError) as e:
        key = f"no reply ({type(e).__name__})"
    with tally.lock:
        tally.bad[kind][key] += 1
        if not key.startswith("4"):
            tally.note(f"bad request {kind} answered {key}")


def _oversized(sock: str, path: str) -> int:
    """9 MiB announced and sent: the server must answer 413 (it may close before the rest arrives)."""
    s = raw(sock, head(path, OVERSIZED))
    try:
        piece = b" " * (1 << 20)
        for _ in range(OVERSIZED >> 20):
            s.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    try:
        while chunk := s.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    finally:
        s.close()
    if not reply.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no status line in {reply[:60]!r}")
    return int(reply.split(b" ", 2)[1])


def disconnect(c: httpx.Client, sock: str, rng: random.Random, tally: Tally) -> None:
    how = rng.choice(("mid_stream", "before_reply", "mid_body"))
    body = json.dumps({"prompt": rng.choice(PROMPTS), "max_tokens": rng.randrange(64, 200),
                       "stream": how == "mid_stream"}).encode()
    try:
        if how == "mid_stream":
            with c.stream("POST", "/v1/completions", content=body) as r:
                if r.status_code == 200:
                    next(r.iter_lines())  # one token, then hang up
                else:
                    how = f"mid_stream (status {r.status_code})"
        elif how == "before_reply":
            s = raw(sock, head("/v1/completions", len(body)) + body)
            time.sleep(rng.uniform(0, 0.3))
            s.close()
        else:
            s = raw(sock, head("/v1/completions", len(body)) + body[:len(body) // 2])
            time.sleep(rng.uniform(0, 0.1))
            s.close()
    except (httpx.HTTPError, OSError, StopIteration) as e:
        how = f"{how} ({type(e).__name__})"
    with tally.lock:
        tally.disconnects[how] += 1


def client_loop(sock: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    with client(sock) as c:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "good":
                good(c, rng, tally)
            elif kind == "bad":
                bad(c, sock, rng, tally)
            else:
                disconnect(c, sock, rng, tally)


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


# -------------------------------------------------------------------------------------------------- report

def summarise(args, tally: Tally, samples: list, health: dict, t_load: float, fds_settled: int | None,
              faults: dict | None, counters: dict, server: dict, cache_mb: int | None) -> dict:
    g = tally.good
    bad_status = collections.Counter()
    for statuses in tally.bad.values():
        bad_status.update(statuses)
    bad_5xx = sum(n for k, n in bad_status.items() if k.startswith("5"))
    bad_other = sum(n for k, n in bad_status.items() if not k.startswith(("4", "5")))
    load = [s for s in samples if s[0] <= t_load + SAMPLE_S]
    rss = [s[1] for s in load] or [0.0]
    mid = min(load, key=lambda s: abs(s[0] - t_load / 2))[1] if load else 0.0
    growth = (rss[-1] - mid) / mid if mid else 0.0
    fds = [s[2] for s in samples] or [0]
    fd_bound = fds[0] + 2 * args.clients + 32  # a connection and a raw socket per client, and headroom
    fds_ok = max(fds) <= fd_bound and fds_settled is not None and fds_settled <= fds[0] + 8

    def sec(x):
        return None if x is None else round(x, 4)

    report = {
        "config": {"minutes": args.minutes, "clients": args.clients, "model": args.model or "embedded default",
                   "stream_cache_mb": cache_mb, "faults": args.faults,
                   "fault_eio_ms": list(args.fault_ms) if args.faults else None, "seed": args.seed,
                   "cores": os.cpu_count(), "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "good": {"sent": g["sent"], "ok": g["ok"], "lost": g["sent"] - g["ok"], "lost_reasons": dict(tally.lost_reasons),
                 "greedy_checked": g["greedy_checked"], "greedy_prompts": len(tally.greedy),
                 "greedy_mismatch": g["mismatch"]},
        "bad": {"sent": sum(bad_status.values()), "status": dict(sorted(bad_status.items())), "5xx": bad_5xx,
                "not_4xx": bad_5xx + bad_other,
                "by_kind": {k: dict(v) for k, v in sorted(tally.bad.items())}},
        "disconnects": {"total": sum(tally.disconnects.values()), **dict(sorted(tally.disconnects.items()))},
        "latency_s": {"whole_p50": sec(percentile(tally.whole_s, 50)), "whole_p99": sec(percentile(tally.whole_s, 99)),
                      "first_token_p50": sec(percentile(tally.ttft_s, 50)),
                      "first_token_p99": sec(percentile(tally.ttft_s, 99)),
                      "stream_p50": sec(percentile(tally.stream_s, 50)),
                      "stream_p99": sec(percentile(tally.stream_s, 99))},
        "tokens": tally.tokens, "load_seconds": round(t_load, 1),
        "tokens_per_s": round(tally.tokens / t_load, 2) if t_load else 0.0,
        "rss_mb": {"start": round(rss[0], 1), "middle": round(mid, 1), "end": round(rss[-1], 1),
                   "max": round(max(rss), 1), "second_half_growth_pct": round(100 * growth, 2), "flat": growth < FLAT},
        "fds": {"start": fds[0], "max": max(fds), "bound": fd_bound, "settled": fds_settled, "bounded": fds_ok},
        "health": {k: v for k, v in health.items() if k != "last"},
        "server_requests": health.get("last", {}).get("requests"),
        "faults": faults, "server_counters": counters, "server": server, "examples": tally.examples,
    }
    failures = []
    if report["good"]["lost"]:
        failures.append(f"{report['good']['lost']} good requests lost")
    if g["mismatch"]:
        failures.append(f"{g['mismatch']} greedy replies differ from the first")
    if report["bad"]["not_4xx"]:
        failures.append(f"{report['bad']['not_4xx']} bad requests not answered 4xx ({bad_5xx} 5xx)")
    if set(health) - {"ok", "last"}:
        failures.append(f"/health failed: {report['health']}")
    if not server["alive_at_end"]:
        failures.append("the server died")
    if not server["clean_exit"]:
        failures.append(f"SIGTERM exit status {server['exit_code']}")
    if not report["rss_mb"]["flat"]:
        failures.append(f"RSS grew {report['rss_mb']['second_half_growth_pct']} % over the second half")
    if not fds_ok:
        failures.append(f"open fds not bounded: {report['fds']}")
    if server.get("clients_stuck"):
        failures.append(f"{server['clients_stuck']} client threads still waiting at the end")
    report["failures"] = failures
    report["pass"] = not failures
    failed_reads = counters.get("edgemoe_expert_reads_failed_total", 0)
    report["notes"] = [f"{failed_reads:.0f} expert reads failed all 4 attempts"
                       + ("; no request was lost to them (a failed prefetch is read again on demand)"
                          if not report["good"]["lost"] else "")] if failed_reads else []
    return report


def table(r: dict) -> str:
    c, g, b, lat, rss, fds, srv = r["config"], r["good"], r["bad"], r["latency_s"], r["rss_mb"], r["fds"], r["server"]

    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f} ms"

    cache = "memory-mapped experts" if c["stream_cache_mb"] is None else f"experts streamed, {c['stream_cache_mb']} MB cache"
    rows = [
        ("run", f"{c['minutes']} min, {c['clients']} clients, {c['model']}, {cache}, faults "
                + (f"on (EIO windows {c['fault_eio_ms'][0]}-{c['fault_eio_ms'][1]} ms)" if c["faults"] else "off")),
        ("machine", f"{c['cores']} cores shared with other work; load average at the end {c['load_avg_end']}"),
        ("good requests", f"sent {g['sent']}, ok {g['ok']}, lost {g['lost']} {g['lost_reasons'] or ''}"),
        ("  greedy check", f"{g['greedy_checked']} replies against {g['greedy_prompts']} first replies, "
                           f"{g['greedy_mismatch']} differ"),
        ("  latency", f"whole p50 {ms(lat['whole_p50'])} p99 {ms(lat['whole_p99'])}; streamed first token "
                      f"p50 {ms(lat['first_token_p50'])} p99 {ms(lat['first_token_p99'])}, total "
                      f"p50 {ms(lat['stream_p50'])} p99 {ms(lat['stream_p99'])}"),
        ("  throughput", f"{r['tokens']} tokens in {r['load_seconds']} s = {r['tokens_per_s']} tok/s"),
        ("bad requests", f"sent {b['sent']}, 5xx {b['5xx']}, not 4xx {b['not_4xx']}; status "
                         + " ".join(f"{k}×{v}" for k, v in b["status"].items())),
        ("disconnects", ", ".join(f"{k} {v}" for k, v in r["disconnects"].items())),
        ("RSS MB", f"start {rss['start']}, middle {rss['middle']}, end {rss['end']}, max {rss['max']}; "
                   f"second half {rss['second_half_growth_pct']:+} % ({'flat' if rss['flat'] else 'GROWING'})"),
        ("open fds", f"start {fds['start']}, max {fds['max']} (bound {fds['bound']}), after load {fds['settled']} "
                     f"({'bounded' if fds['bounded'] else 'NOT BOUNDED'})"),
        ("/health", ", ".join(f"{k} {v}" for k, v in r["health"].items()) + f"; server requests {r['server_requests']}"),
    ]
    if r["faults"] is not None:
        f = r["faults"]
        rows.append(("faults", f"{f['windows']} windows opened ({f['windows_hit']} hit a read); injected {f['injected']}"))
    if r["server_counters"]:
        rows.append(("server counters", ", ".join(f"{k.removeprefix('edgemoe_')} {int(v) if v == int(v) else round(v, 4)}"
                                                  for k, v in r["server_counters"].items())))
    rows.append(("server", f"alive at the end: {'yes' if srv['alive_at_end'] else 'NO'}; SIGTERM → exit "
                           f"{srv['exit_code']} in {srv['stop_seconds']} s ({'clean' if srv['clean_exit'] else 'NOT CLEAN'});"
                           f" log {srv['log_lines']} lines, {srv['tracebacks']} tracebacks"))
    rows += [("note", n) for n in r["notes"]]
    rows.append(("RESULT", "PASS" if r["pass"] else "FAIL: " + "; ".join(r["failures"])))
    out = [f"{k:<16} {v}" for k, v in rows]
    out += [f"  e.g. {e}" for e in r["examples"]]
    return "\n".join(out)


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
