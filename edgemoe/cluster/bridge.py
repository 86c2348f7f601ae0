"""One HTTP request carried through a Ray Serve call: the front door sends the request whole, the replica runs it
through its ASGI application in-process and streams the response back as items.

Items a replica yields: first {"status", "headers", "body", "more"} (the response's start with its first body
bytes), then, while "more" was true, the rest of the body as bytes, gathered over at most ITEM_INTERVAL_S per item. A
non-streamed reply is therefore one item.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

# Headers that describe one hop's connection, not the reply (RFC 9110 §7.6.1): never forwarded.
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade", b"te",
                         b"trailer", b"proxy-authorization", b"proxy-authenticate"})
APP_EXIT_S = 5.0
# A streamed reply's bytes go back at most this often: each item is a round trip through Ray (~0.3 ms of CPU
# on each side), so a token per item would cost a small box more than the tokens themselves.
ITEM_INTERVAL_S = 0.05  # after the reply ends or the caller goes away, how long the application has to wind down


def request_item(scope: dict, body: bytes) -> dict:
    """What a replica needs of a request the front door received: method, path, query, headers and body."""
    return {"method": scope["method"], "path": scope["path"], "query": scope.get("query_string", b""),
            "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_HEADERS], "body": body,
            "client": scope.get("client")}


async def call_app(app, item: dict, headers: list[tuple[bytes, bytes]] = ()):
    """Run ASGI `app` on the request `item` (request_item); yield the response, with `headers` added, as the module
    docstring says. When the caller stops iterating (the client went away), the application sees
    http.disconnect."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": item["method"], "scheme": "http", "path": item["path"], "raw_path": item["path"].encode(),
             "query_string": item["query"], "root_path": "", "headers": item["headers"],
             "client": tuple(item["client"]) if item.get("client") else None, "server": None}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": item["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    loop = asyncio.get_running_loop()
    start = None
    held: list[bytes] = []  # body bytes not yet sent, gathered since `since`
    since = 0.0
    try:
        while True:
            if held:  # wait for more only until the interval is up, then send what there is
                try:
                    message = await asyncio.wait_for(out.get(), max(0.0, since + ITEM_INTERVAL_S - loop.time()))
                except TimeoutError:
                    yield b"".join(held)
                    held = []
                    continue
            else:
                message = await out.get()
            if message is None:
                if start is not None:  # the application ended without finishing its body
                    yield {**start, "body": b"", "more": False}
                elif held:
                    yield b"".join(held)
                return
            if message["type"] == "http.response.start":
                start = {"status": message["status"], "headers": [*message.get("headers", []), *headers]}
                continue
            if message["type"] != "http.response.body":
                continue
            body, more = message.get("body", b""), message.get("more_body", False)
            if start is not None:  # the first bytes go at once: they are the client's time to first token
                yield {**start, "body": body, "more": more}
                start = None
            elif body:
                if not held:
                    since = loop.time()
                held.append(body)
            if not more:
                if held:
                    yield b"".join(held)
                return
    finally:
        gone.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, APP_EXIT_S)


def sse_error(message: str, status: int = 502) -> bytes:
    """The event that ends a streamed reply whose replica failed mid-way: the error as `edgemoe serve` sends an
    engine failure mid-stream, then [DONE]."""
    from ..server.checks import RequestError

    return f"data: {json.dumps(RequestError(message, None, status).body())}\n\ndata: [DONE]\n\n".encode()
