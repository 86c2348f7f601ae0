"""The cluster's front door: one OpenAI-compatible endpoint (UNIX socket or TCP) on the head node.

Each request is forwarded whole to a replica of the model it names (`model`; with one model, every request goes
to it) through the model's Ray Serve handle — Ray picks the replica with the shorter queue — and the replica's
reply is relayed as it comes (bridge.py). A replica lost before it answered (killed, its node gone) costs a retry
on another, for up to RETRY_WINDOW_S while Ray replaces it; a reply already streaming when its replica is lost
ends with an error event, never a hang. /health, /metrics and /cluster/status speak for every replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..server.body import decode_json, read_body
from ..server.checks import RequestError
from ..server.guard import LastResort
from ..server.http_errors import http_error
from ..server.limits import HttpLimits
from ..server.noise import Throttle
from .bridge import HOP_HEADERS, request_item, sse_error
from .promtext import merge
from .router import affinity_key

log = logging.getLogger("edgemoe.cluster")
RETRY_WINDOW_S = 60.0  # a request no replica could take is retried this long (Ray replaces a lost replica)
RETRY_FIRST_S = 0.25  # the first wait before a retry; doubled each time up to RETRY_MAX_S
RETRY_MAX_S = 2.0
DEPLOYMENT = "engine"  # each model is a Ray Serve application of this one deployment


class _Disconnected(Exception):
    pass


@dataclass
class FrontDoor:
    """What the front door's routes need: a handle per model, the registry, the limits and the counters."""

    handles: dict  # model name → ray.serve.handle.DeploymentHandle
    registry: object  # the registry actor (registry.py)
    limits: HttpLimits = field(default_factory=HttpLimits)
    noise: Throttle = field(default_factory=lambda: Throttle(log))
    listening: str = ""
    outcomes: Counter = field(default_factory=Counter)  # answered, retried, rejected, broken, disconnected
    started: float = field(default_factory=time.time)

    def model_for(self, body: object) -> str:
        """The model a request body (parsed; None when it is not JSON) names; with one model, that one.
        RequestError (400/404) for a body that names none of several, or one not served; a body that is not JSON
        goes to the first model, whose replica answers it as `edgemoe serve` would."""
        names = list(self.handles)
        if len(names) == 1 or body is None:
            return names[0]
        served = ", ".join(f"'{n}'" for n in names)
        name = body.get("model") if isinstance(body, dict) else None
        if name is None:
            raise RequestError(f"'model' is required: this cluster serves {served} (GET /v1/models)", "model")
        if not isinstance(name, str) or name not in self.handles:
            raise RequestError(f"the model {str(name)[:80]!r} does not exist here; this cluster serves {served} "
                               "(GET /v1/models)", "model", 404)
        return name

    def replica_states(self) -> dict[str, dict]:
        """Ray Serve's replica counts by state, per model (a blocking call to the Serve controller)."""
        from ray import serve

        apps = serve.status().applications
        out = {}
        for name in self.handles:
            app = apps.get(name)
            dep = None if app is None else app.deployments.get(DEPLOYMENT)
            out[name] = {"status": "missing" if app is None else str(getattr(app.status, "value", app.status)),
                         "replica_states": {} if dep is None else {str(k): v for k, v in dep.replica_states.items()}}
        return out

    async def cluster(self) -> dict:
        """Models with their replica counts, every reporting replica's figures (without its Prometheus text)."""
        states, reports = await asyncio.gather(asyncio.to_thread(self.replica_states), self.registry.reports.remote())
        models = {}
        for name, st in states.items():
            running = st["replica_states"].get("RUNNING", 0)
            models[name] = {"replicas_running": running, "replica_states": st["replica_states"],
                            "application": st["status"], "up": running > 0}
        replicas = [{"replica": r, **{k: v for k, v in f.items() if k != "prometheus"}}
                    for r, f in sorted(reports.items(), key=lambda rf: (rf[1]["model"], rf[0]))]
        return {"models": models, "replicas": replicas, "prometheus": {r: f for r, f in reports.items() if f["up"]},
                "front_door": {"pid": os.getpid(), "listening": self.listening,
                               "uptime_seconds": round(time.time() - self.started, 1),
                               "requests": dict(self.outcomes)}}


def _reply(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _await(call):
    return await call


async def _first(call, stream: bool, request: Request | None):
    """The reply's first item (a whole reply's only one); _Disconnected when the client leaves first."""
    nxt = asyncio.ensure_future(call.__anext__() if stream else _await(call))
    if request is None:
        return await nxt
    gone = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
    if nxt in done:
        gone.cancel()
        return nxt.result()
    nxt.cancel()
    raise _Disconnected


def _lost():
    """The errors that mean a replica was lost (its process or node), not that the request was bad."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, StopAsyncIteration


async def relay(front: FrontDoor, name: str, item: dict, request: Request | None = None,
                stream: bool = False) -> Response:
    """Forward `item` to a replica of model `name` and relay its reply (retrying while no replica has answered).
    `stream`: the reply comes in pieces (a streamed completion); else in one call, which costs Ray less."""
    from ray.serve.exceptions import BackPressureError

    lost = _lost()
    deadline = time.monotonic() + RETRY_WINDOW_S
    delay = RETRY_FIRST_S
    while True:
        handle = front.handles[name]
        gen = handle.options(stream=True).http.remote(item) if stream else handle.whole.remote(item)
        try:
            first = await _first(gen, stream, request)
            break
        except _Disconnected:
            gen.cancel()
            front.outcomes["disconnected"] += 1
            return Response(status_code=499)
        except BackPressureError:
            front.outcomes["rejected"] += 1
            return _reply(RequestError(f"the replicas of '{name}' are full (batching.max_queue requests wait at "
                                       "each); try again later", None, 429))
        except lost as e:
            why = "it ended without a reply" if isinstance(e, StopAsyncIteration) else type(e).__name__
            if time.monotonic() + delay > deadline:
                front.outcomes["rejected"] += 1
                return _reply(RequestError(f"no replica of '{name}' answered within {RETRY_WINDOW_S:g} s (the last "
                                           f"one tried was lost: {why}); see `edgemoe cluster status`", None, 503))
            front.outcomes["retried"] += 1
            front.noise.note("replicas lost", "a replica of %s was lost before it answered (%s); trying another",
                             name, why)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)
    front.outcomes["answered"] += 1
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in first["headers"]
               if k.lower() not in HOP_HEADERS}
    if not first["more"]:
        return Response(first["body"], first["status"], headers)
    return StreamingResponse(_rest(front, name, gen, first["body"], headers), first["status"], headers)


async def _rest(front: FrontDoor, name: str, gen, first: bytes, headers: dict):
    """The rest of a streamed reply; an error event (server-sent events) or a cut connection (anything else) when
    its replica is lost mid-way."""
    finished = False
    try:
        if first:
            yield first
        async for part in gen:
            yield part
        finished = True
    except _lost() as e:
        front.outcomes["broken"] += 1
        front.noise.note("replicas lost", "a replica of %s was lost mid-reply (%s)", name, type(e).__name__)
        if not headers.get("content-type", "").startswith("text/event-stream"):
            raise
        finished = True
        yield sse_error(f"the replica of '{name}' serving this request was lost mid-reply ({type(e).__name__}); "
                        "send the request again")
    finally:
        if not finished:  # the client went away: the replica's engine cancels the request
            gen.cancel()


def build_front(front: FrontDoor, api_key: str | None = None):
    """The front door's ASGI application (behind the same last-resort handler and API-key check as `serve`)."""

    async def forward(request: Request) -> Response:
        try:
            body = await read_body(request, front.limits)
            try:
                parsed = decode_json(body, front.limits)
            except RequestError:
                parsed = None
            name = front.model_for(parsed)
        except RequestError as e:
            return _reply(e)
        except ClientDisconnect:
            return Response(status_code=499)
        item = request_item(request.scope, body)
        item["affinity"] = affinity_key(parsed)  # router.py: a replica that holds the prompt's start is preferred
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        return await relay(front, name, item, request, stream)

    async def get_from(name: str, path: str) -> Response:
        return await relay(front, name, {"method": "GET", "path": path, "query": b"", "headers": [], "body": b""})

    async def models(request: Request) -> Response:
        replies = await asyncio.gather(*(get_from(name, "/v1/models") for name in front.handles))
        data = []
        for reply in replies:
            if reply.status_code != 200:
                return reply
            data.extend(json.loads(reply.body)["data"])
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id not in front.handles:
            served = ", ".join(f"'{n}'" for n in front.handles)
            return _reply(RequestError(f"the model '{model_id[:80]}' does not exist here; this cluster serves "
                                       f"{served} (GET /v1/models)", "model", 404))
        return await get_from(model_id, f"/v1/models/{model_id}")

    async def health(request: Request) -> Response:
        c = await front.cluster()
        up = [m["up"] for m in c["models"].values()]
        status = "ok" if all(up) else "degraded" if any(up) else "down"
        replicas = [{k: r[k] for k in ("replica", "model", "node", "pid", "up", "silent_s", "queue", "running")}
                    for r in c["replicas"]]
        return JSONResponse({"status": status, "models": c["models"], "replicas": replicas},
                            status_code=200 if status == "ok" else 503)

    async def status(request: Request) -> Response:
        c = await front.cluster()
        del c["prometheus"]
        return JSONResponse(c)

    async def metrics(request: Request) -> Response:
        c = await front.cluster()
        texts = [({}, _front_metrics(front, c))]
        for replica, figures in sorted(c["prometheus"].items()):
            texts.append(({"model": figures["model"], "replica": replica, "node": figures["node"]},
                          figures["prometheus"]))
        return PlainTextResponse(merge(texts), media_type="text/plain; version=0.0.4")

    routes = [Route("/v1/completions", forward, methods=["POST"]),
              Route("/v1/chat/completions", forward, methods=["POST"]),
              Route("/tokenize", forward, methods=["POST"]),
              Route("/detokenize", forward, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/cluster/status", status, methods=["GET"])]
    app = LastResort(lambda on_exception: Starlette(routes=routes, exception_handlers={
        Exception: on_exception, HTTPException: http_error}))
    if api_key is None:
        return app
    from ..server.auth import ApiKeyAuth

    return ApiKeyAuth(app, api_key, front.noise)


def _front_metrics(front: FrontDoor, c: dict) -> str:
    lines = ["# HELP edgemoe_cluster_requests_total Requests at the front door by outcome (retried: a replica was "
             "lost before it answered, and another was tried).",
             "# TYPE edgemoe_cluster_requests_total counter"]
    lines += [f'edgemoe_cluster_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(front.outcomes.items())]
    lines += ["# HELP edgemoe_cluster_replicas Ray Serve replicas by model and state.",
              "# TYPE edgemoe_cluster_replicas gauge"]
    for name, m in c["models"].items():
        lines += [f'edgemoe_cluster_replicas{{model="{name}",state="{s}"}} {n}'
                  for s, n in sorted(m["replica_states"].items())]
    return "\n".join(lines) + "\n"
