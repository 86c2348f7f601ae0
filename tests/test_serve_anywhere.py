"""`edgemoe serve` starts anywhere: on its default socket ($RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR, else
~/.cache/edgemoe), as a user other than root, on TCP alone, and on a network address only behind an API key
(edgemoe/server/auth.py). The servers run the embedded model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys

import httpx
import pytest
from conftest import REPO

from edgemoe.cli import main
from edgemoe.commands.serve import default_socket
from edgemoe.server.auth import ApiKeyAuth
from tools.serve_process import start

KEY = "test-key-5f1c9a7e2b8d4c60"
COMPLETION = {"prompt": [1, 2], "max_tokens": 2, "temperature": 0}
OUTSIDE_SYSTEMD = {"RUNTIME_DIRECTORY": ""}  # empty counts as unset, even when pytest itself runs under systemd
NOBODY = 65534


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list[str], where: str, log, **kw):
    """A server started with tools/serve_process.py (answering GET /health at `where`), stopped by SIGTERM."""
    proc = start(args, where, log, cwd=REPO, **kw)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def uds(path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://edgemoe", timeout=120)


def key_file(tmp_path, mode: int = 0o600, text: str = KEY + "\n"):
    path = tmp_path / "api-key"
    path.write_text(text)
    path.chmod(mode)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("edgemoe: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------- the default socket


def test_default_socket_order(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    assert default_socket({"RUNTIME_DIRECTORY": f"{run}:/elsewhere", "XDG_RUNTIME_DIR": "/x"}) == f"{run}/edgemoe.sock"
    assert default_socket({"XDG_RUNTIME_DIR": str(run)}) == f"{run}/edgemoe.sock"
    # No runtime directory (or one this user cannot use, as after `su`): the per-user cache directory, made 0700.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for env in ({}, {"XDG_RUNTIME_DIR": str(tmp_path / "gone")}):
        assert default_socket(env) == f"{tmp_path}/home/.cache/edgemoe/edgemoe.sock"
    assert stat.S_IMODE(os.stat(tmp_path / "home/.cache/edgemoe").st_mode) == 0o700
    assert default_socket({"XDG_CACHE_HOME": str(tmp_path / "c")}) == f"{tmp_path}/c/edgemoe/edgemoe.sock"


def test_no_place_for_the_socket_is_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the directory would go
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert main(["serve"]) == 2
    assert "--socket PATH or --tcp 127.0.0.1:PORT" in one_line_error(capsys)


def test_serve_without_socket_flags_answers_on_xdg_runtime_dir(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    sock = xdg / "edgemoe.sock"
    with serving([], str(sock), tmp_path / "log", env={**OUTSIDE_SYSTEMD, "XDG_RUNTIME_DIR": str(xdg)}):
        with uds(sock) as c:
            r = c.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert f"listening on {sock}\n" in (tmp_path / "log").read_text()
    assert not sock.exists()


def _as_nobody(env: dict) -> list[str] | None:
    """setpriv's arguments that run a command as uid/gid 65534 and can still start this interpreter, or None.
    The interpreter may live where nobody may not look (pyenv under /root, mode 0700): then the command keeps
    CAP_DAC_READ_SEARCH, which lets it read and list files, never write them."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    base = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = [sys.executable, "-c", f"import os, edgemoe.commands.serve; os.listdir({env['XDG_RUNTIME_DIR']!r})"]
    for caps in ([], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
        r = subprocess.run(base + caps + probe, cwd=REPO, env={**os.environ, **env}, capture_output=True)
        if r.returncode == 0:
            return base + caps
    return None


def _numba_cache_for(user_dir) -> None:
    """Numba's cache of the kernels, copied where another user finds it ($NUMBA_CACHE_DIR): that user cannot write
    the in-tree __pycache__, so Numba would not use it and would compile for a minute. If Numba's layout moved,
    the server compiles instead (slower, same result)."""
    try:
        from numba.core.caching import _CacheLocator
    except ImportError:
        return
    for pycache in (REPO / "edgemoe").rglob("__pycache__"):
        files = list(pycache.glob("*.nb[ic]"))
        if files:
            dst = user_dir / _CacheLocator.get_suitable_cache_subpath(str(pycache.parent / "x.py"))
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst)


def test_serve_as_another_user(tmp_path):
    """As uid 65534 with HOME and XDG_RUNTIME_DIR its own: it answers on $XDG_RUNTIME_DIR/edgemoe.sock."""
    home = tmp_path / "home"
    xdg = home / "run"
    xdg.mkdir(parents=True)
    _numba_cache_for(home / "numba")
    for d, _, files in os.walk(home):
        os.chown(d, NOBODY, NOBODY)
        for f in files:
            os.chown(os.path.join(d, f), NOBODY, NOBODY)
    xdg.chmod(0o700)
    env = {**OUTSIDE_SYSTEMD, "HOME": str(home), "XDG_RUNTIME_DIR": str(xdg), "XDG_CACHE_HOME": str(home / ".cache"),
           "NUMBA_CACHE_DIR": str(home / "numba")}
    tmp_path.chmod(0o755)  # pytest's directories above it are 0700: then setpriv keeps the capability to look in
    setpriv = _as_nobody(env)
    if setpriv is None:
        pytest.skip("needs root and setpriv to start the server as another user")
    sock = xdg / "edgemoe.sock"
    # start() runs `python *python_args serve ARGS`: this python replaces itself with setpriv, which runs edgemoe.
    exec_rest = ("-c", "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])", *setpriv, sys.executable, "-m", "edgemoe")
    with serving([], str(sock), tmp_path / "log", env=env, python_args=exec_rest, timeout_s=300) as proc:
        with open(f"/proc/{proc.pid}/status") as f:
            assert any(line.split()[:2] == ["Uid:", str(NOBODY)] for line in f)
        assert os.stat(sock).st_uid == NOBODY
        with uds(sock) as c:
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200


# ------------------------------------------------------------------------------------------------- TCP


def test_tcp_alone_serves_tcp_only(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(["--tcp", f"127.0.0.1:{port}"], url, tmp_path / "log",
                 env={**OUTSIDE_SYSTEMD, "XDG_RUNTIME_DIR": str(xdg)}):
        r = httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert list(xdg.iterdir()) == []  # no socket
    assert f"listening on {url}\n" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("addr", ["0.0.0.0:8080", "[::]:8080", "192.168.1.20:8080"])
def test_network_address_without_key_is_refused(tmp_path, capsys, addr):
    assert main(["serve", "--socket", str(tmp_path / "s.sock"), "--tcp", addr]) == 2
    err = one_line_error(capsys)
    assert f"--tcp {addr} is not a loopback address" in err and "--api-key-file FILE" in err
    assert not (tmp_path / "s.sock").exists()


def test_network_address_in_the_config_needs_a_key_file(tmp_path, capsys):
    cfg = tmp_path / "edgemoe.yaml"
    cfg.write_text("server:\n  tcp: 0.0.0.0:8080\n")
    assert main(["config", "check", str(cfg)]) == 2
    assert "server.tcp: 0.0.0.0:8080 is not a loopback address" in one_line_error(capsys)
    cfg.write_text(f"server:\n  tcp: 0.0.0.0:8080\n  api_key_file: {key_file(tmp_path)}\n")
    assert main(["config", "check", str(cfg)]) == 0


def test_api_key_guards_every_request_but_health(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(["--tcp", f"0.0.0.0:{port}", "--api-key-file", str(key_file(tmp_path))], url, tmp_path / "log",
                 env=OUTSIDE_SYSTEMD):
        with httpx.Client(base_url=url, timeout=120) as c:
            assert c.get("/health").status_code == 200  # open: probes poll it
            for headers, says in [({}, "no API key"), ({"Authorization": "Bearer wrong-key-000000000"}, "incorrect"),
                                  ({"Authorization": f"Basic {KEY}"}, "Bearer"), ({"Authorization": KEY}, "Bearer")]:
                r = c.post("/v1/completions", json=COMPLETION, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and says in err["message"], err
                assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", None, "invalid_api_key")
            assert c.get("/v1/models").status_code == 401 and c.get("/metrics").status_code == 401
            auth = {"Authorization": f"Bearer {KEY}"}
            r = c.post("/v1/completions", json=COMPLETION, headers=auth)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert c.get("/v1/models", headers=auth).status_code == 200
    log = (tmp_path / "log").read_text()
    assert f"listening on http://0.0.0.0:{port}; every request but GET /health needs the API key" in log
    assert KEY not in log


@pytest.mark.parametrize("mode, text, says", [
    (0o644, KEY, "may be read or written by every user (mode 0644); chmod 600"),
    (0o602, KEY, "may be read or written by every user"),
    (0o600, "", "is empty"),
    (0o600, "short\n", "fewer than 16"),
    (0o600, "two words but long enough\n", "without spaces"),
])
def test_bad_key_files_are_refused(tmp_path, capsys, mode, text, says):
    path = key_file(tmp_path, mode, text)
    assert main(["serve", "--tcp", "0.0.0.0:8080", "--api-key-file", str(path)]) == 2
    err = one_line_error(capsys)
    assert says in err and err.startswith(f"edgemoe: error: --api-key-file {path}"), err


def test_key_file_problems_name_the_config_key(tmp_path, capsys):
    cfg = tmp_path / "edgemoe.yaml"
    cfg.write_text(f"server:\n  api_key_file: {tmp_path / 'missing'}\n")
    assert main(["serve", "--config", str(cfg), "--tcp", "127.0.0.1:8080"]) == 2
    assert "server.api_key_file" in one_line_error(capsys)
    assert main(["serve", "--tcp", "0.0.0.0:8080", "--api-key", "short"]) == 2
    assert "--api-key: the API key has 5 characters" in one_line_error(capsys)


# ------------------------------------------------------------------------------- the middleware alone


def _through(app, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The status `app` answers a GET of `path` with `headers`."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_middleware_header_forms():
    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = ApiKeyAuth(ok, KEY)
    auth = b"authorization"
    assert _through(app, "/v1/models", [(auth, f"Bearer {KEY}".encode())]) == 200
    assert _through(app, "/v1/models", [(auth, f"bearer  {KEY} ".encode())]) == 200  # scheme is case-insensitive
    assert _through(app, "/health", []) == 200
    assert _through(app, "/health/", []) == 401  # only the exact path is open
    assert _through(app, "/v1/models", [(auth, f"Bearer {KEY}".encode())] * 2) == 401
    assert _through(app, "/v1/models", [(auth, f"Bearer {KEY}x".encode())]) == 401
    assert _through(app, "/v1/models", [(auth, b"Bearer \xff")]) == 401
