"""`edgemoe serve` in a subprocess, returned once its /health answers 200: the one way the tests and
tools/soak.py start a real server.

    from tools.serve_process import start     # the tests (pytest runs with the repo root on sys.path)
    proc = start(["-m", model, "--socket", sock], sock, sock + ".log")
    for t, n in stream_tokens(sock, {"prompt": "Hi", "max_tokens": 8, "stream": True}): ...
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import httpx

TAIL = 3000  # characters of the server's log quoted when it does not come up
PROBE_S = 10.0  # one /health request; a server still compiling its kernels may be slow to answer


def start(args: Sequence[str], sock: str, log_path: str | os.PathLike, *, env: dict | None = None,
          cwd: str | os.PathLike | None = None, timeout_s: float = 120.0, poll_s: float = 0.1,
          python_args: Sequence[str] = ("-m", "edgemoe"), **popen) -> subprocess.Popen:
    """`python -m edgemoe serve *args` (or `python *python_args serve *args`) with its stderr in `log_path`,
    returned once GET /health on the UNIX socket `sock` (or at "http://HOST:PORT") answers 200. `env` is added to
    this process's environment; `popen` goes to subprocess.Popen (pass_fds, preexec_fn, ...). Raises RuntimeError with the
    log's tail if the server exits first or is not up within `timeout_s` (a cold Numba cache compiles the
    kernels first); it is killed in the second case."""
    with open(log_path, "w") as log:  # a file, not a pipe: a chatty server never blocks on a full pipe
        proc = subprocess.Popen([sys.executable, *python_args, "serve", *args], stderr=log, cwd=cwd,
                                env=None if env is None else {**os.environ, **env}, **popen)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail(log_path)}")
        if healthy(sock):
            return proc
        time.sleep(poll_s)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server did not come up in {timeout_s:.0f} s: {tail(log_path)}")


def healthy(sock: str) -> bool:
    """Whether GET /health on the UNIX socket `sock` (or at `sock` = "http://HOST:PORT") answers 200 now."""
    url = sock.startswith("http://")
    transport = None if url else httpx.HTTPTransport(uds=sock)
    try:
        with httpx.Client(transport=transport, base_url=sock if url else "http://edgemoe", timeout=PROBE_S) as c:
            return c.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def tail(log_path: str | os.PathLike) -> str:
    with open(log_path, errors="replace") as f:
        return f.read()[-TAIL:]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("edgemoe")
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def stream_lines(sock: str, body: dict, client: str = "http") -> Iterator[str]:
    """The lines of a streamed POST /v1/completions on the UNIX socket `sock`. client "http": the standard
    library's http.client (~40 µs of CPU per token here); "httpx": as the openai package reads a stream
    (~250-330 µs) — on a small box a benchmark's client takes that CPU from the server."""
    if client == "httpx":
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=600) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                yield from r.iter_lines()
        return
    c = _UnixConnection(sock)
    try:
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"the server answered {r.status}: {r.read()[:200]!r}")
        while line := r.readline():
            yield line.decode().rstrip("\n")
    finally:
        c.close()


def stream_tokens(sock: str, body: dict, client: str = "http") -> Iterator[tuple[float, int]]:
    """(arrival time, tokens) per SSE chunk that carries tokens, counted by its token_ids (a token may add no
    text of its own)."""
    for line in stream_lines(sock, body, client):
        if line.startswith("data: {"):
            n = len(json.loads(line[6:])["choices"][0].get("token_ids") or [])
            if n:
                yield time.perf_counter(), n
