"""A small client for `edgemoe serve` over its UNIX socket (or loopback TCP), built on httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from .errors import EdgeMoEError

DEFAULT_SOCKET = "/run/edgemoe/edgemoe.sock"


class ServerError(EdgeMoEError):
    """The server answered with an error status (its message is kept)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


class Client:
    """Talks to one server. `socket` is a UNIX socket path; `base_url` a http://127.0.0.1:PORT alternative."""

    def __init__(self, socket: str | None = DEFAULT_SOCKET, base_url: str | None = None, timeout: float = 600.0):
        transport = httpx.HTTPTransport(uds=socket) if base_url is None else None
        self.socket = socket if base_url is None else None
        self.http = httpx.Client(transport=transport, base_url=base_url or "http://edgemoe",
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            return self.http.request(method, path, json=body)
        except httpx.TransportError as e:
            where = self.http.base_url if self.socket is None else self.socket
            raise EdgeMoEError(f"cannot reach the server at {where}: {e}; is `edgemoe serve` running?") from None

    def _post(self, path: str, body: dict) -> dict:
        return _checked(self._send("POST", path, body))

    def complete(self, prompt: str | list[int], **params) -> dict:
        """POST /v1/completions; the whole reply."""
        return self._post("/v1/completions", {"prompt": prompt, **params})

    def chat(self, messages: list[dict], **params) -> dict:
        """POST /v1/chat/completions; the whole reply."""
        return self._post("/v1/chat/completions", {"messages": messages, **params})

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """POST with stream=true; yields each chunk's JSON. Closing the iterator cancels the request."""
        try:
            with self.http.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    _checked(r)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServerError(chunk["error"].get("code") or 500, chunk["error"]["message"])
                    yield chunk
        except httpx.TransportError as e:
            raise EdgeMoEError(f"lost the server at {self.socket}: {e}") from None

    def stream_chat(self, messages: list[dict], **params) -> Iterator[dict]:
        return self.stream("/v1/chat/completions", {"messages": messages, **params})

    def stream_complete(self, prompt: str | list[int], **params) -> Iterator[dict]:
        return self.stream("/v1/completions", {"prompt": prompt, **params})

    def health(self) -> dict:
        return _checked(self._send("GET", "/health"))

    def models(self) -> dict:
        return _checked(self._send("GET", "/v1/models"))

    def metrics(self) -> str:
        r = self._send("GET", "/metrics")
        if r.status_code != 200:
            raise ServerError(r.status_code, r.text)
        return r.text


def _checked(r: httpx.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text}}
    if r.status_code != 200:
        raise ServerError(r.status_code, (body.get("error") or {}).get("message", r.text))
    return body
