"""HTTP routes (starlette): validate, tokenize, hand the job to the engine, relay its events.

The event loop never runs the model: it only enqueues jobs and streams what the engine thread emits
(through loop.call_soon_threadsafe into an asyncio.Queue per request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.request import Request as Job
from ..errors import EdgeMoEError
from ..sampling import SamplingParams
from .body import decode_json, read_body
from .engine import Engine
from .guard import LastResort, internal_error, new_error_id
from .limits import HttpLimits
from .metrics import prometheus
from .noise import Throttle
from .scheduler import QueueFull, ShuttingDown, UnknownClass
from .schemas import CompletionRequest, RequestError, chat_prompt, parse_request

DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI's API
DEFAULT_CHAT_MAX_TOKENS = 512  # chat: this or the rest of the context, whichever is smaller

log = logging.getLogger("edgemoe.server")


@dataclass
class Service:
    """What the routes need: the engine and the facts requests are checked against."""

    engine: Engine
    tokenizer: object | None
    model_name: str
    n_ctx: int
    defaults: SamplingParams  # the config's `sampling` section
    info: object = dict  # () → dict: how the engine runs (threads, layout, streaming, thermal, speculation)
    limits: HttpLimits = field(default_factory=HttpLimits)
    noise: Throttle = field(default_factory=lambda: Throttle(log))  # client-caused events: one line each, no floods

    def make_job(self, req: CompletionRequest, emit) -> Job:
        """Tokenize and check a validated request against the context; RequestError names the field."""
        field = "messages" if req.chat else "prompt"
        if isinstance(req.prompt, list):
            vocab = self.engine.core.model.args.vocab_size
            bad = [t for t in req.prompt if t >= vocab]
            if bad:
                raise RequestError(f"'prompt' token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
            ids = req.prompt
        else:
            if self.tokenizer is None:
                raise RequestError(f"this model carries no vocabulary; send '{field}' as a list of token ids",
                                   field)
            ids = self.tokenizer.encode(chat_prompt(req.messages) if req.chat else req.prompt)
        if len(ids) >= self.n_ctx:
            raise RequestError(f"'{field}' is {len(ids)} tokens; the context holds {self.n_ctx} including the "
                               "reply; shorten it", field)
        room = self.n_ctx - len(ids)
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(DEFAULT_CHAT_MAX_TOKENS if req.chat else DEFAULT_MAX_TOKENS, room)
        elif max_tokens > room:
            raise RequestError(f"'max_tokens' {max_tokens} + the prompt's {len(ids)} tokens exceed the context of "
                               f"{self.n_ctx}; ask for at most {room}", "max_tokens")
        d = self.defaults
        params = SamplingParams(
            temperature=_pick(req.temperature, d.temperature), top_k=_pick(req.top_k, d.top_k),
            top_p=_pick(req.top_p, d.top_p), min_p=_pick(req.min_p, d.min_p),
            repeat_penalty=_pick(req.repeat_penalty, d.repeat_penalty),
            repeat_last_n=_pick(req.repeat_last_n, d.repeat_last_n), seed=_pick(req.seed, d.seed))
        return Job(ids, max_tokens, params, stops=req.stop, logprobs=req.logprobs, priority=req.priority, emit=emit)


def _pick(v, default):
    return default if v is None else v


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return _reply(RequestError(message, param, status))


def _reply(e: RequestError) -> JSONResponse:
    # 408/413: the rest of the body is still on its way; closing is cheaper than reading it.
    headers = {"connection": "close"} if e.status in (408, 413) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _engine_error(service: Service, job: Job, event: dict) -> RequestError:
    """An engine failure as the client sees it: a 500's message may name the server's files, so it goes to the log
    under an id and the client gets the id."""
    status = event.get("status", 500)
    if status != 500:
        return RequestError(event["message"], None, status)
    error_id = new_error_id()
    log.error("%s: request %d failed: %s", error_id, job.id, event["message"])
    return internal_error(error_id)


def build_app(service: Service) -> LastResort:
    """The ASGI application serving `service`: starlette's routes inside the last-resort exception handler."""
    engine = service.engine
    noise = service.noise

    async def handle(request: Request, chat: bool) -> Response:
        try:
            body = decode_json(await read_body(request, service.limits), service.limits)
        except RequestError as e:
            if e.status == 408:
                noise.note("slow requests", "answered 408: a request body took over %g s", service.limits.read_timeout_s,
                           burst=1)
            return _reply(e)
        except ClientDisconnect:
            noise.note("client hang-ups", "a client hung up while sending its request")
            return Response(status_code=499)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:  # engine thread → event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        try:
            req = parse_request(body, chat)
            job = await asyncio.to_thread(service.make_job, req, emit)  # tokenizing 8 MB takes seconds: off the loop
            engine.submit(job)
        except RequestError as e:
            return _reply(e)
        except UnknownClass as e:
            return _error(400, str(e), "priority")
        except ShuttingDown as e:
            return _error(503, str(e))
        except QueueFull as e:
            engine.metrics.request_done("rejected")
            return _error(429, str(e))
        except EdgeMoEError as e:  # e.g. text the tokenizer refuses
            return _error(400, str(e), "messages" if chat else "prompt")
        reply = Reply(service, chat, job)
        if req.stream:
            return StreamingResponse(_sse(service, job, queue, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def watch() -> None:  # the client hanging up ends the request at the engine's next step
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.cancel(job)
            queue.put_nowait({"type": "disconnected"})

        watcher = asyncio.create_task(watch())
        try:
            while True:
                event = await queue.get()
                if event["type"] == "token":
                    reply.add(event)
                elif event["type"] == "disconnected":
                    noise.note("client hang-ups", "a client hung up waiting for its reply; request %d cancelled", job.id)
                    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
                elif event["type"] == "error":
                    return _reply(_engine_error(service, job, event))
                else:
                    return JSONResponse(reply.final(event))
        finally:
            watcher.cancel()
            if not job.done:
                engine.cancel(job)

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": int(engine.metrics.started),
             "owned_by": "edgemoe", "context_length": service.n_ctx}]})

    async def health(request: Request) -> Response:
        ok = engine.is_alive()
        changed = engine.core.files.error
        status = "ok" if ok else "model file changed on disk; restart the service" if changed else "engine stopped"
        return JSONResponse({"status": status, "model": service.model_name,
                             "n_ctx": service.n_ctx, "engine": service.info(), **engine.metrics.snapshot()},
                            status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(prometheus(engine.metrics.snapshot(), _cache_figures(engine.core.model)),
                                 media_type="text/plain; version=0.0.4")

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return LastResort(lambda on_exception: Starlette(routes=routes, exception_handlers={Exception: on_exception}))


def _cache_figures(model) -> dict | None:
    experts = getattr(model, "experts", None)
    if experts is None or not hasattr(experts, "stats"):
        return None
    st = experts.stats()
    io = st["io"]
    return {"hit_rate": st["cache"]["hit_rate"], "hits": st["cache"]["hits"], "misses": st["cache"]["misses"],
            "bytes_read": io["bytes_read"], "read_retries": io.get("retries", 0),
            "recovered_reads": io.get("recovered_reads", 0), "failed_reads": io.get("errors", 0)}


class Reply:
    """Builds OpenAI-shaped bodies (whole replies and stream chunks) from engine events."""

    def __init__(self, service: Service, chat: bool, job: Job):
        self.service, self.chat, self.job = service, chat, job
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text: list[str] = []
        self.events: list[dict] = []

    def add(self, event: dict) -> None:
        self.text.append(event["text"])
        self.events.append(event)

    def _piece(self, tok: int) -> str:
        tk = self.service.tokenizer
        return tk.token_to_piece(tok) if tk is not None else str(tok)

    def _logprobs(self, events: list[dict]) -> dict | None:
        if not self.job.logprobs:
            return None
        if self.chat:
            return {"content": [{"token": self._piece(e["id"]), "id": e["id"], "logprob": e["logprob"],
                                 "top_logprobs": [{"token": self._piece(i), "id": i, "logprob": lp}
                                                  for i, lp in e["top"]]} for e in events]}
        return {"tokens": [self._piece(e["id"]) for e in events], "token_ids": [e["id"] for e in events],
                "token_logprobs": [e["logprob"] for e in events],
                "top_logprobs": [{self._piece(i): lp for i, lp in e["top"]} for e in events]}

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.model_name}

    @staticmethod
    def usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    def final(self, done: dict) -> dict:
        text = "".join(self.text)
        choice = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": self._logprobs(self.events),
                  "token_ids": [e["id"] for e in self.events]}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": self.usage(done)}

    def chunk(self, events: list[dict], finish_reason: str | None = None, first: bool = False) -> dict:
        text = "".join(e["text"] for e in events)
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": self._logprobs(events) if events else None,
                  "token_ids": [e["id"] for e in events]}
        if self.chat:
            delta = {"content": text} if events else {}  # the last chunk carries finish_reason only
            choice["delta"] = {"role": "assistant", **delta} if first else delta
        else:
            choice["text"] = text
        return {**self._head(True), "choices": [choice]}


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(service: Service, job: Job, queue: asyncio.Queue, reply: Reply):
    """Server-sent events: one chunk per token, a last chunk with finish_reason and usage, then [DONE]."""
    engine = service.engine
    first = True
    finished = False  # the reply ran to its end (else the client went away, or the server is stopping)
    try:
        while True:
            event = await queue.get()
            if event["type"] == "token":
                yield _data(reply.chunk([event], first=first))
                first = False
            elif event["type"] == "error":
                finished = True
                yield _data(_engine_error(service, job, event).body())
                yield "data: [DONE]\n\n"
                return
            else:
                finished = True
                last = reply.chunk([], finish_reason=event["finish_reason"])
                last["usage"] = reply.usage(event)
                yield _data(last)
                yield "data: [DONE]\n\n"
                return
    finally:
        if not job.done:  # the client went away (the stream was cancelled) or the server is stopping
            if not finished:
                service.noise.note("client hang-ups", "a client hung up during its streamed reply; request %d "
                                   "cancelled", job.id)
            engine.cancel(job)
