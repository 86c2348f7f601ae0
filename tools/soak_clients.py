"""The soak's client threads (tools/soak.py): good requests checked in full, bad ones that must get a 4xx,
and clients that hang up; everything they see counted in one Tally."""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
import time

import httpx

TIMEOUT_S = 120.0  # one good request, queueing included; longer counts as lost

PROMPTS = ["KING HENRY.\n", "ROMEO.\nO", "To be, or not to be", "First Citizen.\n", "HAMLET.\nMy lord,",
           "Enter the King", "What news, my lord?", "The king is", "JULIET.\n", "Good morrow, sweet",
           "O, what a", "PORTIA.\nThe quality of mercy"]

# (kind, method, path, raw body): every one must be answered 4xx.
BAD = [
    ("malformed_json", "POST", "/v1/completions", b'{"prompt": "KING", "max_tokens": 4'),
    ("not_json", "POST", "/v1/chat/completions", b"hello there"),
    ("unsupported_field", "POST", "/v1/completions", b'{"prompt": "KING", "max_tokens": 4, "suffix": "x"}'),
    ("image_part", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}'),
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


def client(sock: str, timeout: float = TIMEOUT_S) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=timeout)


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
