"""`edgemoe repl` against a real server (embedded model) that is killed in the middle of a streamed reply: one
line naming what happened and how to recover, exit code 1, no traceback. The server logs one line per start
phase (loading, warming up, serving)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import httpx
import pexpect

from tools.serve_process import start


def running(sock: str) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=10) as c:
        return c.get("/health").json()["running"]


def test_server_killed_mid_reply(tmp_path):
    sock = str(tmp_path / "edgemoe.sock")
    server = start(["--socket", sock, "--ctx", "2048"], sock, tmp_path / "server.log")
    try:
        log = (tmp_path / "server.log").read_text()
        for phase in ("loading the embedded model", "warming up", "serving default-moe.gguf"):
            assert phase in log, log
        env = dict(os.environ, HOME=str(tmp_path), TERM="dumb")
        c = pexpect.spawn(sys.executable, ["-m", "edgemoe", "repl", "--socket", sock], env=env, encoding="utf-8",
                          timeout=60)
        c.expect("> ")
        for setting in ("max_tokens 1500", "temperature 0"):  # greedy runs on to the length limit, ~40 s
            c.sendline(f"/set {setting}")
            c.expect("> ")
        c.sendline("Speak on")
        deadline = time.monotonic() + 60
        while running(sock) == 0:
            assert time.monotonic() < deadline, "the reply never started"
            time.sleep(0.05)
        time.sleep(0.5)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        c.expect(pexpect.EOF)
        c.close()
        # readline may reset the terminal's attributes (ESC [ 0 m) as the process exits, after the last line
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", c.before)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert c.exitstatus == 1, c.before
        assert "Traceback" not in c.before
        assert lines[-1].startswith("edgemoe: error: the server at ") and "went away mid-reply" in lines[-1], lines
        assert "start it again" in lines[-1]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
