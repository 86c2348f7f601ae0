"""A hostile client against the real server (a subprocess on a UNIX socket, the embedded model): bodies that
never end, connections that never send, JSON built to crash the decoder, sampling values that overflow, faults
whose messages name the server's files, clients that hang up. Each must cost one short reply and at most one
short log line, never a traceback flood or a leaked path."""

from __future__ import annotations

import json
import logging
import re
import resource
import select
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO
from test_server import _wait_for, client
from test_systemd import UNITS, value

from edgemoe.cli import main
from edgemoe.server.limits import BACKLOG, MAX_BODY_BYTES, MAX_CONNECTIONS, NOFILE_RESERVE
from edgemoe.server.noise import Throttle, loop_exception_handler
from tools.serve_process import start

READ_TIMEOUT = 2.0  # the server's --read-timeout: short, so slow clients are cut within the test's patience
NOFILE = 64  # the server's open-file limit: it must lower its connection cap to fit (--max-connections 1000)
SECRET = "/srv/edgemoe/secret/experts.pack"  # in the injected faults' messages; must never reach a client

# `edgemoe serve` with two faults injected, keyed by prompt: an exception inside the route, and an engine
# failure whose message names a file (as a failed expert read's would).
BOOT = f"""
import sys
from edgemoe.cli import main
from edgemoe.server import app

make_job = app.Service.make_job

def faulty_make_job(self, req, emit):
    if req.prompt == "raise an internal error":
        raise FileNotFoundError(2, "No such file or directory", {SECRET!r})
    if req.prompt == "fail in the engine":
        def emit_failure(event):
            failure = {{"type": "error", "status": 500, "message": "OSError: [Errno 5] Input/output error: {SECRET}"}}
            emit(failure if event["type"] == "token" else event)
        return make_job(self, req, emit_failure)
    return make_job(self, req, emit)

app.Service.make_job = faulty_make_job
sys.exit(main(sys.argv[1:]))
"""


class Server:
    """The running server: its socket, process and log."""

    def __init__(self, sock: str, proc: subprocess.Popen, log_path: str):
        self.sock, self.proc, self.log_path = sock, proc, log_path

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_since(self, mark: int) -> str:
        return self.log()[mark:]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.sock)
        return s


def _low_nofile() -> None:  # in the child, before exec: as a unit with a small LimitNOFILE= would
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("abuse") / "edgemoe.sock")
    log_path = sock + ".log"
    args = ["--socket", sock, "--ctx", "1024", "--max-connections", "1000", "--read-timeout", str(READ_TIMEOUT)]
    proc = start(args, sock, log_path, python_args=("-c", BOOT), cwd=REPO, poll_s=0.05,
                 preexec_fn=_low_nofile)
    try:
        yield Server(sock, proc, log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def recv_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:  # it closed with our unread request still queued: what it sent is in `out`
        pass
    return out


def response(raw: bytes) -> tuple[int, dict | None]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else None


def post_raw(srv: Server, head: bytes, body: bytes = b"") -> socket.socket:
    s = srv.connect()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: edgemoe\r\n" + head + b"\r\n" + body)
    return s


def assert_healthy(srv: Server, mark: int) -> None:
    """The server still answers, and logged no traceback since `mark` (an offset in its log)."""
    with client(srv.sock) as c:
        r = c.post("/v1/completions", json={"prompt": "the king", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "Traceback" not in srv.log_since(mark), srv.log_since(mark)[-3000:]


# ----------------------------------------------------------------------------------------------- 1. bodies


def test_chunked_body_is_cut_at_the_limit(server):
    """100 MB chunked: the server stops reading after MAX_BODY_BYTES, answers 413 JSON and closes."""
    mark, rss = len(server.log()), server.rss_mb()
    s = post_raw(server, b"Transfer-Encoding: chunked\r\n")
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"  # 1 MiB
    sent = 0
    try:
        for _ in range(100):
            s.sendall(chunk)
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = response(recv_all(s))
    s.close()
    assert status == 413 and "at most" in body["error"]["message"], body
    assert sent < 100 and sent * 0x100000 <= MAX_BODY_BYTES + 8 * 0x100000  # refused early, not after reading all
    assert server.rss_mb() - rss < 64
    assert_healthy(server, mark)


@pytest.mark.parametrize("head", [
    b"Content-Length: 104857600\r\n",  # announces 100 MB: refused before a byte of it is read
    b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",  # announces 10 bytes, then sends chunks without end
])
def test_lying_content_length(server, head):
    s = post_raw(server, head)
    try:
        for _ in range(100):
            s.sendall(b"100000\r\n" + b" " * 0x100000 + b"\r\n" if b"chunked" in head else b" " * 0x100000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = response(recv_all(s))
    s.close()
    assert status == 413 and body["error"]["code"] == 413


# ---------------------------------------------------------------------------- 2. slow and idle connections


def test_slow_body_gets_408(server):
    s = post_raw(server, b"Content-Length: 1000\r\n", b'{"prompt": ')
    t0 = time.monotonic()
    s.settimeout(0.2)
    raw = b""
    with pytest.raises((BrokenPipeError, ConnectionResetError)):  # one byte every 0.2 s until the server closes
        while time.monotonic() - t0 < 10:
            s.sendall(b" ")
            try:
                raw += s.recv(4096)
            except TimeoutError:
                pass
    raw += recv_all(s, 1)
    s.close()
    status, body = response(raw)
    assert status == 408 and "did not arrive within" in body["error"]["message"]
    assert time.monotonic() - t0 < READ_TIMEOUT + 2


@pytest.mark.parametrize("trickle", [b"", b"X-Slow: 1\r\n"], ids=["idle", "slow-headers"])
def test_connection_without_whole_headers_is_closed(server, trickle):
    s = server.connect()
    t0 = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: edgemoe\r\n" if trickle else b"")
    s.settimeout(0.2)
    raw = b""
    while time.monotonic() - t0 < 10:
        try:
            if trickle:
                s.sendall(trickle)
            chunk = s.recv(4096)
            if not chunk:
                break
            raw += chunk
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            raw += recv_all(s, 1)
            break
    s.close()
    assert time.monotonic() - t0 < READ_TIMEOUT + 2
    assert response(raw)[0] == 408


def test_connection_cap_fits_the_open_file_limit(server):
    """200 connections that send nothing, against a server whose open-file limit is 64: it lowered its cap to fit
    at start, answers the connections beyond it 503 at once, never fails accept() with EMFILE, and logs a few
    lines where it used to write a traceback per failed accept()."""
    mark = len(server.log())
    cap = int(re.search(r"accepting at most (\d+) connections instead of 1000", server.log()).group(1))
    assert 1 <= cap <= NOFILE // 2
    conns = [server.connect() for _ in range(200)]  # connect() waits while the server's backlog is full
    try:
        held, refused = set(conns), 0
        deadline = time.monotonic() + READ_TIMEOUT / 2  # the held ones are closed (408) after READ_TIMEOUT
        while refused < len(conns) - cap and time.monotonic() < deadline:
            readable, _, _ = select.select(list(held), [], [], 0.05)
            for s in readable:
                status, body = response(recv_all(s))
                assert status == 503 and "connections open" in body["error"]["message"]
                held.discard(s)
                refused += 1
        assert len(held) <= cap and refused >= len(conns) - cap
        held = list(held)
        held[-1].settimeout(5)  # a held one is served
        held[-1].sendall(b"GET /health HTTP/1.1\r\nHost: edgemoe\r\n\r\n")
        assert held[-1].recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in conns:
            s.close()
    log = server.log_since(mark)
    assert "Too many open files" not in log and "Traceback" not in log
    assert len(log.splitlines()) <= 12, log  # a handful of lines, not one per refused connection
    _wait_for(lambda: _accepts(server), "the refused ones to be gone")
    assert_healthy(server, mark)


def _accepts(server: Server) -> bool:
    with server.connect() as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: edgemoe\r\nConnection: close\r\n\r\n")
        return recv_all(s, 5).startswith(b"HTTP/1.1 200")


def test_systemd_open_file_limit_fits_the_cap():
    assert int(value(UNITS / "edgemoe.service", "LimitNOFILE")) >= MAX_CONNECTIONS + BACKLOG + NOFILE_RESERVE


def test_accept_errors_are_one_line_and_throttled(caplog):
    """asyncio retries accept() every second while EMFILE lasts: one line, then one count a minute."""
    now = [0.0]
    log = logging.getLogger("test.noise")
    handler = loop_exception_handler(Throttle(log, clock=lambda: now[0]), log)
    emfile = OSError(24, "Too many open files")
    with caplog.at_level(logging.INFO, logger="test.noise"):
        for t in range(120):
            now[0] = float(t)
            handler(None, {"message": "socket.accept() out of system resource", "exception": emfile})
    lines = [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is None for r in caplog.records)
    assert lines[0] == ("socket.accept() out of system resource: Too many open files; raise LimitNOFILE= or lower "
                        "--max-connections")
    assert len(lines) == 3 and "59 more in the last 60 s" in lines[1]


# ------------------------------------------------------------------------------------------ 3. hostile JSON


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["ok", "\\udfff"]}', "stop[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x", "\\ud800": 1}]}', "messages[0]"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ' + b"[" * 100 + b"]" * 100 + b"}", "stop"),
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 4300 + b"}", "seed"),
    ("/v1/completions", b'{"prompt": [1, ' + b"7" * 5000 + b"]}", "prompt[1]"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e-300}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e-5}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e300}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "repeat_penalty": 1e-300}', "repeat_penalty"),
    ("/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "' + b"a" * 100000 + b'"}', "max_tokens"),
])
def test_hostile_json_is_400_naming_the_field(server, path, raw, param):
    mark = len(server.log())
    with client(server.sock) as c:
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and len(err["message"]) < 300, err
    assert "Traceback" not in server.log_since(mark)


def test_smallest_temperature_and_surrogate_pairs_still_work(server):
    with client(server.sock) as c:
        r = c.post("/v1/completions", content=b'{"prompt": "the king \\ud83d\\ude00", "max_tokens": 3, '
                                              b'"temperature": 1e-4, "repeat_penalty": 1e4}')
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


# -------------------------------------------------------------------------------- 4. the --tcp address


@pytest.mark.parametrize("addr, says", [
    ("127.0.0.1:99999", "port must be from 1 to 65535"),
    ("127.0.0.1:0", "port must be from 1 to 65535"),
    ("127.0.0.1", "HOST:PORT"),
    ("127.0.0.1:", "HOST:PORT"),
    (":8080", "HOST:PORT"),
    ("127.0.0.1:80a", "HOST:PORT"),
    ("127.0.0.1:\u0661\u0662", "HOST:PORT"),  # Arabic-Indic digits: str.isdigit() says yes
    ("example.com:8080", "loopback"),
    ("0.0.0.0:8080", "loopback"),
    ("[::1:8080", "HOST:PORT"),
    ("999.1.1.1:8080", "loopback"),
])
def test_bad_tcp_address_is_one_line(tmp_path, capsys, addr, says):
    assert main(["serve", "--socket", str(tmp_path / "s.sock"), "--tcp", addr]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgemoe: error: --tcp") and says in err and "\n" not in err, err
    assert not (tmp_path / "s.sock").exists()


def test_bad_tcp_port_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "--socket", str(tmp_path / "s.sock"), "--tcp",
                        "127.0.0.1:99999"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("edgemoe: error: "), r.stderr


# ------------------------------------------------------------------------------------- 5. internal errors


@pytest.mark.parametrize("prompt, stream", [("raise an internal error", False), ("fail in the engine", False),
                                            ("fail in the engine", True)])
def test_internal_errors_hide_paths(server, prompt, stream):
    """500s carry an id and no detail; the log has the details under the id, and a route's traceback only the
    first time that exception is raised there."""
    mark = len(server.log())
    ids = []
    with client(server.sock) as c:
        for _ in range(2):
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": stream})
            if stream:
                assert r.status_code == 200
                body = json.loads(r.text.split("data: ")[1])
            else:
                assert r.status_code == 500 and r.headers["content-type"] == "application/json"
                body = r.json()
            err = body["error"]
            assert err["code"] == 500 and err["type"] == "server_error"
            assert "/srv" not in r.text and "secret" not in r.text and "Errno" not in r.text, r.text
            ids.append(re.search(r"\(id (err-[0-9a-f]{12})\)", err["message"]).group(1))
    log = server.log_since(mark)
    assert all(log.count(i) == 1 for i in ids) and log.count(SECRET) >= 2, log  # the details, under the ids
    assert log.count("Traceback") == (1 if prompt == "raise an internal error" else 0), log
    assert_healthy(server, len(server.log()))


# ------------------------------------------------------------------------------------------ 6. hang-ups


def test_hang_ups_are_one_line_each(server):
    mark = len(server.log())
    s = post_raw(server, b"Content-Length: 100\r\n", b'{"prompt"')  # mid-body
    time.sleep(0.1)
    s.close()
    body = json.dumps({"prompt": [1, 5, 9], "max_tokens": 1000}).encode()  # while the reply is generated
    s = post_raw(server, b"Content-Length: %d\r\n" % len(body), body)
    time.sleep(0.2)
    s.close()
    body = json.dumps({"prompt": [1, 5, 9], "max_tokens": 1000, "stream": True}).encode()  # mid-stream
    s = post_raw(server, b"Content-Length: %d\r\n" % len(body), body)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    _wait_for(lambda: server.log_since(mark).count("hung up") == 3, "three hang-up lines", timeout=20)
    log = server.log_since(mark)
    assert "while sending its request" in log and "waiting for its reply" in log and "streamed reply" in log
    assert "Traceback" not in log and len(log.splitlines()) == 3, log
    with client(server.sock) as c:
        _wait_for(lambda: c.get("/health").json()["running"] == 0, "the cancelled requests to leave")
