"""The pieces of `edgemoe cluster` that need no Ray: a request carried through call_app (bridge.py) and the
Prometheus texts of several replicas merged (promtext.py, checked with prometheus_client's parser)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from edgemoe.cluster.bridge import call_app, request_item, sse_error
from edgemoe.cluster.promtext import merge
from edgemoe.server.metrics import Metrics, prometheus


def _app(seen: dict):
    async def echo(request):
        body = await request.json()
        return JSONResponse({"got": body, "path": request.url.path, "q": request.query_params.get("q")},
                            headers={"x-test": "1"})

    async def stream(request):
        async def events():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                seen["closed"] = True

        async def watch():  # as server/app.py's non-streamed replies watch for the client going away
            while (await request.receive())["type"] != "http.disconnect":
                pass
            seen["disconnect"] = True

        asyncio.get_running_loop().create_task(watch())
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream, methods=["POST"])])


def _item(path: str, body: bytes, query: bytes = b"") -> dict:
    scope = {"method": "POST", "path": path, "query_string": query, "client": ("127.0.0.1", 5),
             "headers": [(b"content-type", b"application/json"), (b"connection", b"keep-alive"),
                         (b"content-length", str(len(body)).encode())]}
    item = request_item(scope, body)
    assert (b"connection", b"keep-alive") not in item["headers"]  # one hop's headers stay behind
    item["headers"].append((b"content-length", str(len(body)).encode()))
    return item


def test_a_whole_reply_is_one_item():
    async def go():
        return [part async for part in call_app(_app({}), _item("/echo", b'{"a": [1, 2]}', b"q=7"))]

    parts = asyncio.run(go())
    assert len(parts) == 1 and parts[0]["status"] == 200 and parts[0]["more"] is False
    assert (b"x-test", b"1") in parts[0]["headers"]
    import json

    assert json.loads(parts[0]["body"]) == {"got": {"a": [1, 2]}, "path": "/echo", "q": "7"}


def test_a_stream_comes_in_pieces_and_stopping_early_disconnects_the_app():
    seen = {}

    async def go():
        gen = call_app(_app(seen), _item("/stream", b"{}"))
        first = await gen.__anext__()
        rest = [await gen.__anext__() for _ in range(3)]
        await gen.aclose()  # the front door's client went away
        await asyncio.sleep(0.05)
        return first, rest

    first, rest = asyncio.run(go())
    assert first["status"] == 200 and first["more"] is True
    assert dict(first["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert b"".join([first["body"], *rest]).startswith(b"data: 0\n\ndata: 1\n\n")
    assert seen.get("closed"), "the application's stream must end when the caller stops reading"


def test_sse_error_is_openai_shaped():
    text = sse_error("the replica was lost").decode()
    import json

    first, done = text.strip().split("\n\n")
    assert json.loads(first[len("data: "):]) == {"error": {"message": "the replica was lost", "type": "server_error",
                                                           "param": None, "code": 502}}
    assert done == "data: [DONE]"


def test_replica_metrics_merge_into_one_valid_exposition():
    parser = pytest.importorskip("prometheus_client.parser")
    m1, m2 = Metrics(), Metrics()
    m1.request_done("ok")
    m2.request_done("rejected")
    t1 = prometheus(m1.snapshot(), {"hit_rate": 0.5, "hits": 1, "misses": 1, "bytes_read": 9, "read_retries": 0,
                                    "recovered_reads": 0, "failed_reads": 0})
    t2 = prometheus(m2.snapshot(), None)
    text = merge([({}, "# HELP edgemoe_cluster_up Up.\n# TYPE edgemoe_cluster_up gauge\nedgemoe_cluster_up 1\n"),
                  ({"replica": "a", "model": 'm"1'}, t1), ({"replica": "b", "model": "m2"}, t2)])
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["edgemoe_cluster_up"].samples[0].labels == {}
    reqs = families["edgemoe_requests"].samples
    counts = {(s.labels["replica"], s.labels["outcome"]): s.value for s in reqs}
    assert counts[("a", "ok")] == 1 and counts[("b", "rejected")] == 1 and counts[("a", "rejected")] == 0
    assert [s.labels["model"] for s in families["edgemoe_expert_cache_hit_rate"].samples] == ['m"1']
    assert text.count("# TYPE edgemoe_tokens_generated_total") == 1
