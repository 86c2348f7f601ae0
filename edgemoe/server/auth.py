"""API keys: with a key, every request but GET /health must send `Authorization: Bearer KEY`, else 401.

The key comes from a file others may not read (`--api-key-file`, `server.api_key_file`) or from `--api-key`;
it is never logged. It is compared with `hmac.compare_digest`, so how long a refusal takes does not tell how
much of a guess was right. /health stays open: probes and tools/serve_process.py poll it, and it shows the
model's name and the engine's figures, never prompts or replies.
"""

from __future__ import annotations

import hmac
import json
import os
import stat

from ..errors import UsageError

OPEN_PATHS = frozenset({"/health"})
MIN_KEY_CHARS = 16  # a shorter key can be guessed over the network
MAX_KEY_FILE_BYTES = 4096


def check_key(key: str, source: str) -> str:
    """`key` when it can be sent in an Authorization header and is long enough; UsageError naming `source`."""
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise UsageError(f"{source}: the API key must be printable ASCII without spaces; make one with "
                         "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if len(key) < MIN_KEY_CHARS:
        raise UsageError(f"{source}: the API key has {len(key)} characters, fewer than {MIN_KEY_CHARS}; make a "
                         "longer one with python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return key


def read_key_file(path: str, source: str = "--api-key-file") -> str:
    """The key in `path` (one line; surrounding whitespace ignored). Refused unless it is a regular file that
    other users can neither read nor write."""
    shown = f"{source} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError as e:
        raise UsageError(f"{shown}: cannot open it ({e.strerror}); pass a readable file holding the key") from None
    try:
        st = os.fstat(fd)  # the file opened, not what the path names a moment later
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{shown} is not a regular file; put the key in one")
        if st.st_mode & 0o006:
            raise UsageError(f"{shown} may be read or written by every user (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"chmod 600 {path} (or 640 for the service's group)")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"{shown} is larger than {MAX_KEY_FILE_BYTES} bytes; it must hold the key only")
    try:
        key = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{shown}: the API key must be printable ASCII without spaces") from None
    if not key:
        raise UsageError(f"{shown} is empty; write the key into it")
    return check_key(key, shown)


class ApiKeyAuth:
    """ASGI middleware in front of the app: a request without the key gets 401 in OpenAI's error shape before
    any route runs (its body is drained, up to DRAIN_BYTES, and dropped)."""

    def __init__(self, app, key: str, noise=None):
        self.app = app
        self._key = key.encode("ascii")
        self.noise = noise  # edgemoe.server.noise.Throttle: refusals are client-caused, so logged without floods

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope["path"] in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope["headers"])
        if problem is None:
            await self.app(scope, receive, send)
            return
        if self.noise is not None:
            self.noise.note("unauthorized requests", "answered 401: %s", problem)
        if scope["type"] != "http":  # a websocket: no route takes one, and none may without the key
            await send({"type": "websocket.close", "code": 1008})
            return
        await _unauthorized(receive, send, problem)

    def _problem(self, headers) -> str | None:
        """None when the request carries the key, else what is wrong (for the reply; never the key sent)."""
        values = [v for k, v in headers if k == b"authorization"]
        if not values:
            return "no API key; send the header Authorization: Bearer KEY"
        if len(values) > 1:
            return "more than one Authorization header; send one: Authorization: Bearer KEY"
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return "the Authorization header must be Bearer KEY"
        if not hmac.compare_digest(token.strip(), self._key):
            return "incorrect API key"
        return None


DRAIN_BYTES = 64 << 10  # a refused request's body read and dropped up to this, so closing never resets the reply


async def _unauthorized(receive, send, message: str) -> None:
    # The body is read (up to DRAIN_BYTES) before the reply: closing a socket with unread data in it sends a
    # TCP reset, which can reach the client before the 401 does. A larger body is not read for nobody.
    drained, more = 0, True
    while more and drained <= DRAIN_BYTES:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        drained += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b'Bearer realm="edgemoe"'), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
