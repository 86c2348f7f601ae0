"""The real server in a subprocess on a temporary UNIX socket, driven with httpx; oracle: transformers' greedy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from mixtral_factory import tiny_gguf_with_vocab
from reference_runs import engine_greedy

from edgemoe.cli import main
from tools.serve_process import start

CTX = 1024  # long enough that a whole reply takes well over the impatient client's 50 ms
MAX_BATCH = 4
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, transformers model, tokenizer) of a tiny Mixtral with a real vocabulary."""
    return tiny_gguf_with_vocab(tmp_path_factory.mktemp("server"))


def start_server(model: str, sock: str, *extra: str, env: dict | None = None, **popen) -> subprocess.Popen:
    args = ["-m", model, "--socket", sock, "--ctx", str(CTX),
            "--set", f"batching.max_batch={MAX_BATCH}", "--set", f"batching.max_queue={MAX_QUEUE}",
            "--set", "batching.admission={interactive: 3, batch: 1}", *extra]
    return start(args, sock, sock + ".log", env=env, **popen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tcp_port():
    return free_port()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, tcp_port):
    sock = str(tmp_path_factory.mktemp("sock") / "edgemoe.sock")
    proc = start_server(tiny[0], sock, "--tcp", f"127.0.0.1:{tcp_port}")
    yield sock
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def client(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=120)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (the oracle)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def stream_events(c: httpx.Client, path: str, body: dict) -> list:
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def at_once(fn, n: int) -> None:
    """fn(0) .. fn(n - 1), each on its own thread, all started before any is waited for."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_completion_greedy_matches_transformers_and_run(server, tiny, capsys):
    path, hf, tok = tiny
    with client(server) as c:
        r = c.post("/v1/completions", json={"prompt": "the king", "max_tokens": 8, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    ids = tok.encode("the king")
    assert choice["token_ids"] == hf_greedy(hf, ids, 8)
    assert choice["text"] == tok.decode(choice["token_ids"]) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}
    lp = choice["logprobs"]
    assert lp["token_ids"] == choice["token_ids"] and all(len(t) == 2 for t in lp["top_logprobs"])
    assert main(["run", "-m", path, "-p", "the king", "-n", "8", "--temp", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == choice["token_ids"]


def test_streaming_equals_whole_reply(server):
    body = {"messages": [{"role": "user", "content": "the sea"}], "max_tokens": 6, "temperature": 0}
    with client(server) as c:
        whole = c.post("/v1/chat/completions", json=body).json()
        events = stream_events(c, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    msg = whole["choices"][0]["message"]
    assert msg["role"] == "assistant" and text == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 6


def test_concurrent_clients_equal_sequential(server, tiny):
    _, hf, _ = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, size=int(rng.integers(2, 9))).tolist() for _ in range(8)]
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        with client(server) as c:
            events = stream_events(c, "/v1/completions", {"prompt": prompts[i], "max_tokens": 10, "temperature": 0,
                                                          "priority": "batch" if i % 2 else "interactive"})
        results[i] = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]

    at_once(ask, 8)
    with client(server) as c:
        sequential = [c.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0})
                      .json()["choices"][0]["token_ids"] for p in prompts]
    assert [results[i] for i in range(8)] == sequential
    assert sequential[0] == hf_greedy(hf, prompts[0], 10)


def test_sixteen_batched_clients_equal_run_on_a_quantised_model(tmp_path):
    """16 clients at once share batched steps (8 running, the rest queued and joining as others end);
    each greedy reply equals edgemoe's own single-sequence greedy run (what `edgemoe run --temp 0` does)."""
    path = tiny_gguf_with_vocab(tmp_path, qtype="Q8_0", expert_qtype="Q4_0")[0]
    sock = str(tmp_path / "q.sock")
    proc = start_server(path, sock, "--set", "batching.max_batch=8", "--set", "batching.max_queue=16",
                        "--set", "batching.prefill_chunk=8")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 300, size=int(rng.integers(2, 20))).tolist() for _ in range(16)]
    n_tokens = [int(n) for n in rng.integers(4, 16, size=16)]  # replies end at different steps
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        with client(sock) as c:
            r = c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": n_tokens[i], "temperature": 0})
        results[i] = r.json()["choices"][0]["token_ids"]

    try:
        at_once(ask, 16)
        with client(sock) as c:
            steps = c.get("/health").json()["steps"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert [results[i] for i in range(16)] == [engine_greedy(path, p, n) for p, n in zip(prompts, n_tokens)]
    assert steps < sum(n_tokens)  # steps were shared


def _health(c: httpx.Client) -> dict:
    return c.get("/health").json()


def _wait_for(pred, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_disconnect_cancels(server):
    with client(server) as c:
        before = _health(c)["requests"]["cancelled"]
        with c.stream("POST", "/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # The connection is closed: the engine drops the request at a later step, long before 100 tokens.
        _wait_for(lambda: _health(c)["requests"]["cancelled"] > before, "the cancellation")
        h = _health(c)
        _wait_for(lambda: _health(c)["running"] == 0, "an empty batch")
        assert h["status"] == "ok"


def test_disconnect_cancels_a_whole_reply_request(server):
    with client(server) as c:
        before = _health(c)["requests"]["cancelled"]
        with httpx.Client(transport=httpx.HTTPTransport(uds=server), base_url="http://edgemoe",
                         timeout=httpx.Timeout(60, read=0.05)) as impatient:
            with pytest.raises(httpx.ReadTimeout):  # gives up long before the reply's end: closes the connection
                # end-of-sequence (id 2) barred so that the reply runs to max_tokens, whatever is sampled
                impatient.post("/v1/completions", json={"prompt": [1, 6], "max_tokens": CTX - 2,
                                                        "logit_bias": {"2": -100}})
        _wait_for(lambda: _health(c)["requests"]["cancelled"] > before, "the cancellation")


def test_full_queue_answers_429(server):
    body = {"prompt": [1, 7, 8], "max_tokens": CTX - 8, "stream": True}  # long replies keep the queue full
    with client(server) as c:
        for _attempt in range(3):  # a slow box: a running reply may end between the check and the request
            with contextlib.ExitStack() as streams:  # leaving it closes every stream: the server cancels them
                for _ in range(MAX_BATCH + MAX_QUEUE):
                    assert streams.enter_context(c.stream("POST", "/v1/completions", json=body)).status_code == 200
                _wait_for(lambda: _health(c)["queue_length"] == MAX_QUEUE, "a full queue")
                r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            if r.status_code == 429:
                break
            _wait_for(lambda: _health(c)["running"] == 0 and _health(c)["queue_length"] == 0, "the queue to empty")
        assert r.status_code == 429 and "max_queue" in r.json()["error"]["message"]
        _wait_for(lambda: _health(c)["running"] == 0 and _health(c)["queue_length"] == 0, "the queue to empty")
        assert c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"prompt": "x", "max_tokens": 4, "suffix": "y"}, "suffix"),  # unknown fields are ignored; this one is refused
    ({"prompt": "x", "max_tokens": "4"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": [1] * CTX}, "prompt"),
    ({"prompt": "the king", "max_tokens": CTX}, "max_tokens"),
    ({"prompt": [1, 10**7]}, "prompt"),
    ({"prompt": "x", "priority": "vip"}, "priority"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_requests_name_the_field(server, body, param):
    with client(server) as c:
        if isinstance(body, bytes):
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and (param is None or param in err["message"])
        assert _health(c)["status"] == "ok"


def test_bad_chat_message(server):
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def test_models_metrics_and_stop_strings(server, tiny):
    _, _, tok = tiny
    with client(server) as c:
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == "tiny.gguf" and models["data"][0]["context_length"] == CTX
        full = c.post("/v1/completions", json={"prompt": "the king", "max_tokens": 8, "temperature": 0}).json()
        text = full["choices"][0]["text"]
        stop = text.strip().split(" ")[1] if len(text.strip().split(" ")) > 1 else text.strip()[-1]
        cut = c.post("/v1/completions", json={"prompt": "the king", "max_tokens": 8, "temperature": 0,
                                               "stop": [stop]}).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.index(stop)]
        m = c.get("/metrics").text
    assert os.stat(server).st_mode & 0o777 == 0o660
    assert "# TYPE edgemoe_tokens_generated_total counter" in m
    for name in ("tokens_per_second", "queue_length", "running_batch_size"):
        assert f"\nedgemoe_{name} " in m


def test_client_and_repl_session(server):
    import io

    from edgemoe.client import Client, ServerError
    from edgemoe.commands.repl import Session

    msgs = [{"role": "user", "content": "the moon"}]
    with Client(socket=server) as cl:
        whole = cl.chat(msgs, max_tokens=5, temperature=0)["choices"][0]["message"]["content"]
        out = io.StringIO()
        session = Session(cl, out=out)
        session.command("/set temperature 0")
        session.command("/set max_tokens 5")
        assert session.say("the moon") == whole and out.getvalue() == whole + "\n"
        session.command("/stats")
        assert "tok/s" in out.getvalue() and len(session.messages) == 2
        session.command("/reset")
        assert session.messages == []
        with pytest.raises(ServerError, match="400"):
            cl.complete("x", max_tokens=0)


def test_loopback_tcp(server, tcp_port):
    r = httpx.post(f"http://127.0.0.1:{tcp_port}/v1/completions", json={"prompt": [1, 3], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_live_socket_is_refused(server, tiny):
    r = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "-m", tiny[0], "--socket", server],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "another server is listening" in r.stderr


def test_sigterm_during_generation_exits_cleanly(tiny, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    states: list[str] = []

    def listen() -> None:  # as systemd does: read every datagram as it comes (the queue holds only a few)
        while True:
            try:
                states.append(notify.recv(4096).decode())
            except OSError:
                return

    notify.settimeout(30)
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    sock = str(tmp_path / "s.sock")
    socket.socket(socket.AF_UNIX).bind(sock)  # a stale socket file from a crashed run: replaced
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"}
    proc = start_server(tiny[0], sock, "--grace", "0", env=env)
    try:
        with client(sock) as c:
            with c.stream("POST", "/v1/completions",
                          json={"prompt": [1, 4], "max_tokens": CTX - 2, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] in ("cancelled", "length")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lambda: "STOPPING=1" in states, "STOPPING=1")
    notify.close()
    assert "READY=1" in states and "WATCHDOG=1" in states
    assert states.index("READY=1") < states.index("STOPPING=1")
    assert not os.path.exists(sock)


def test_socket_activation_uses_fd_3(tiny, tmp_path):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    fd = listener.fileno()
    # As systemd does: the listening socket is fd 3 and LISTEN_FDS=1; --socket is then not used.
    proc = start_server(tiny[0], path, env={"LISTEN_FDS": "1"}, pass_fds=(3, fd),
                        preexec_fn=lambda: os.dup2(fd, 3))
    try:
        with client(path) as c:
            r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        listener.close()
    assert os.path.exists(path)  # the socket unit, not the service, owns the file


def test_serve_from_config_like_the_systemd_unit(tiny, tmp_path):
    """`edgemoe serve --config FILE` alone, as systemd/edgemoe.service starts it: the experts stream through the
    config's cache tiers, the SSD thermal governor runs (on a fake drive sensor), `threads` is applied on the
    engine thread, `context_length` is the context and `speculative` picks the proposer; replies equal plain
    greedy decoding."""
    import yaml

    hw = tmp_path / "hwmon" / "hwmon0"
    hw.mkdir(parents=True)
    (hw / "name").write_text("nvme\n")
    (hw / "temp1_input").write_text("41000\n")
    sock = tmp_path / "unit.sock"
    cfg = tmp_path / "edgemoe.yaml"
    cfg.write_text(yaml.safe_dump({
        "inference": {"model": tiny[0], "kv_cache_type": "f32"}, "threads": 1, "context_length": 200,
        "server": {"socket": str(sock)},
        "cache": {"tiers": [{"name": "hot", "capacity": 1, "policy": "lru"}]},
        "speculative": {"proposer": "lookup", "max_tokens": 3}}))
    proc = start(["--config", str(cfg)], str(sock), tmp_path / "unit.log",
                 env={"EDGEMOE_HWMON_ROOT": str(tmp_path / "hwmon")})
    try:
        with client(str(sock)) as c:
            r = c.post("/v1/completions", json={"prompt": [1, 5, 9, 44], "max_tokens": 12, "temperature": 0})
            health = c.get("/health").json()
            metrics = c.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert r.json()["choices"][0]["token_ids"] == engine_greedy(tiny[0], [1, 5, 9, 44], 12, "f32")
    eng = health["engine"]
    assert eng["kv_cache"] == "f32"  # inference.kv_cache_type acts through serve --config
    assert eng["streaming"] and "edgemoe_expert_bytes_read_total" in metrics
    assert eng["threads"] == 1 and health["n_ctx"] == 200
    assert eng["thermal"]["running"] and eng["thermal"]["temperature"] == 41.0
    assert eng["speculative"] == "lookup"
