"""Request validation for the OpenAI-style endpoints: every error names the offending field (HTTP 400)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MAX_STOPS = 8
# The sampler divides float32 logits by the temperature (and by the repeat penalty): below 1e-4 the quotient
# overflows float32 for large logits (1e-300 rounds to 0.0: a division by zero). Any temperature that small
# already samples the argmax; 0 says so exactly. Above 1e4 every token is equally likely, whatever the model says.
MIN_SCALE, MAX_SCALE = 1e-4, 1e4
MAX_SEED = 2**64 - 1  # numpy's PCG64 seeds from 64 bits


class RequestError(ValueError):
    """A bad request; `param` names the field, `status` the HTTP code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.status}}


@dataclass
class CompletionRequest:
    """A validated request; sampling fields left None take the server's `sampling` defaults."""

    chat: bool
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content"}]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    logprobs: int = 0  # top alternatives per token; 0 = no logprobs
    priority: str | None = None
    model: str | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check(cond: bool, name: str, what: str, value: Any) -> None:
    if not cond:
        raise RequestError(f"'{name}' must be {what}, got {_show(value)}", name)


def _show(value: Any) -> str:
    """The offending value for an error message, cut short: it may be megabytes long."""
    return _cut(repr(value))


def _cut(s: str, limit: int = 60) -> str:
    return s if len(s) <= limit else s[:limit - 3] + "..."


# field → (test, description)
_NUMERIC = {
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_num(v) and (v == 0 or MIN_SCALE <= v <= MAX_SCALE),
                    f"0 (greedy) or a number from {MIN_SCALE:g} to {MAX_SCALE:g}"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "min_p": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "repeat_penalty": (lambda v: _is_num(v) and MIN_SCALE <= v <= MAX_SCALE,
                       f"a number from {MIN_SCALE:g} to {MAX_SCALE:g} (1 = off)"),
    "repeat_last_n": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "seed": (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
}
_COMMON = set(_NUMERIC) | {"model", "stop", "stream", "priority", "n", "user"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo"}
_CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs"}


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """Validate a decoded JSON body of /v1/completions (chat=False) or /v1/chat/completions (chat=True)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    allowed = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        name = _cut(unknown[0])
        raise RequestError(f"unknown field '{name}'; accepted fields: {', '.join(sorted(allowed))}", name)
    req = CompletionRequest(chat=chat)
    for name, (ok, what) in _NUMERIC.items():
        v = body.get(name)
        if v is not None:
            _check(ok(v), name, what, v)
            setattr(req, name, v)
    if body.get("n", 1) != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {_show(body['n'])}", "n")
    if body.get("echo", False) is not False:
        raise RequestError("'echo' is not supported; leave it out or false", "echo")
    for name in ("model", "priority", "user"):
        v = body.get(name)
        _check(v is None or isinstance(v, str), name, "a string", v)
    req.model, req.priority = body.get("model"), body.get("priority")
    stream = body.get("stream", False)
    _check(isinstance(stream, bool), "stream", "true or false", stream)
    req.stream = stream
    req.stop = _stops(body.get("stop"))
    if chat:
        req.messages = _messages(body.get("messages"))
        lp, top = body.get("logprobs", False), body.get("top_logprobs")
        _check(lp is None or isinstance(lp, bool), "logprobs", "true or false", lp)
        _check(top is None or (_is_int(top) and 0 <= top <= MAX_LOGPROBS), "top_logprobs",
               f"an integer from 0 to {MAX_LOGPROBS}", top)
        if top and not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        req.logprobs = (top or 1) if lp else 0  # the chosen token's logprob needs one top entry at least
    else:
        req.prompt = _prompt(body.get("prompt"))
        lp = body.get("logprobs")
        _check(lp is None or (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS), "logprobs",
               f"an integer from 0 to {MAX_LOGPROBS} (alternatives per token)", lp)
        req.logprobs = 0 if lp is None else max(lp, 1)  # 0 still returns the chosen tokens' logprobs
    return req


def _stops(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    _check(isinstance(v, list) and all(isinstance(s, str) and s for s in v) and len(v) <= MAX_STOPS, "stop",
           f"a non-empty string or a list of up to {MAX_STOPS} non-empty strings", v)
    return list(v)


def _prompt(v: Any) -> str | list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # OpenAI allows a batch of prompts; one is fine
    if isinstance(v, str):
        _check(v != "", "prompt", "a non-empty string", v)
        return v
    _check(isinstance(v, list) and len(v) > 0 and all(_is_int(t) and t >= 0 for t in v), "prompt",
           "a non-empty string or a non-empty list of token ids", v if not isinstance(v, list) else "a list")
    return list(v)


def _messages(v: Any) -> list[dict]:
    _check(isinstance(v, list) and len(v) > 0, "messages", "a non-empty list of {role, content} objects", v)
    out = []
    for i, m in enumerate(v):
        name = f"messages[{i}]"
        _check(isinstance(m, dict), name, "an object with 'role' and 'content'", m)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise RequestError(f"unknown field '{name}.{_cut(extra[0])}'", f"{name}.{_cut(extra[0])}")
        role, content = m.get("role"), m.get("content")
        _check(isinstance(role, str) and role != "", f"{name}.role", "a non-empty string", role)
        _check(isinstance(content, str), f"{name}.content", "a string", content)
        out.append({"role": role, "content": content})
    return out


def chat_prompt(messages: list[dict]) -> str:
    """A plain chat template for models without one: "role: content" lines, then "assistant:"."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"
