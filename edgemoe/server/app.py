"""HTTP routes (starlette): validate, tokenize, hand the job to the engine, relay its events.

The event loop never runs the model: it only enqueues jobs and streams what the engine thread emits
(through a Channel per request, server/channel.py). A stream writes every event that has arrived in one write,
then pauses STREAM_INTERVAL_S before the next: each token is still its own SSE event, sent at most that much
later, and a fast stream costs the loop (which shares the interpreter lock with the engine's Python) a wake-up
and a write per few tokens instead of per token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat.generic_tools import generic_messages
from ..engine.request import Request as Job
from ..errors import EdgeMoEError
from ..sampling import SamplingParams
from .auth import ApiKeyAuth
from .body import decode_json, read_body
from .channel import Channel
from .choices import choice_seed, make_jobs, submit_all
from .constraints import json_grammar, tool_grammar
from .engine import Engine
from .guard import LastResort, internal_error, new_error_id
from .http_errors import http_error
from .limits import HttpLimits
from .metrics import prometheus
from .noise import Throttle
from .reply import Reply
from .scheduler import QueueFull, ShuttingDown, UnknownClass
from .schemas import CompletionRequest, RequestError, parse_request
from .tokens_api import detokenize, route, tokenize

DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI's API
DEFAULT_CHAT_MAX_TOKENS = 512  # chat: this or the rest of the context, whichever is smaller
STREAM_INTERVAL_S = 0.004  # a stream's writes are at least this far apart (the events in between go together)

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
    chat_template: object = None  # edgemoe.chat.ChatTemplate (Session.chat_template); None: the plain format

    def __post_init__(self):
        if self.chat_template is None:
            from ..chat import ChatTemplate

            self.chat_template = ChatTemplate.plain(self.tokenizer)

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
            ids = self._chat_ids(req) if req.chat else self.tokenizer.encode(req.prompt)
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
        vocab = self.engine.core.model.args.vocab_size
        bad = [t for t, _ in req.logit_bias if t >= vocab]
        if bad:
            raise RequestError(f"'logit_bias' names token {bad[0]}, outside the vocabulary (0..{vocab - 1})",
                               f"logit_bias.{bad[0]}")
        d = self.defaults
        params = SamplingParams(
            temperature=_pick(req.temperature, d.temperature), top_k=_pick(req.top_k, d.top_k),
            top_p=_pick(req.top_p, d.top_p), min_p=_pick(req.min_p, d.min_p),
            repeat_penalty=_pick(req.repeat_penalty, d.repeat_penalty),
            repeat_last_n=_pick(req.repeat_last_n, d.repeat_last_n),
            seed=choice_seed(_pick(req.seed, d.seed), req.choice),
            presence_penalty=_pick(req.presence_penalty, d.presence_penalty),
            frequency_penalty=_pick(req.frequency_penalty, d.frequency_penalty), logit_bias=req.logit_bias)
        grammar = None if req.json_schema is None else json_grammar(req.json_schema, self.tokenizer, vocab)
        if req.chat and req.tools is not None and req.tools.active:
            grammar = tool_grammar(self.chat_template.tool_format, req.tools, self.tokenizer, vocab)
        return Job(ids, max_tokens, params, stops=req.stop, stop_ids=self.chat_template.stop_ids if req.chat else (),
                   logprobs=req.logprobs, priority=req.priority, grammar=grammar, emit=emit)


    def _chat_ids(self, req: CompletionRequest) -> list[int]:
        """The chat prompt's ids: the template with the request's tools (edgemoe.chat.tool_formats) and its
        `chat_template_kwargs`."""
        tools = req.tools
        if tools is None:
            return self.chat_template.encode(req.messages, **req.template_kwargs)
        if tools.active and self.chat_template.tool_format.generic:
            messages = generic_messages(req.messages, tools.constrained_tools, parallel=tools.parallel,
                                        auto=tools.choice == "auto")
            return self.chat_template.encode(messages, **req.template_kwargs)
        return self.chat_template.encode(req.messages, tools=tools.listed(), **req.template_kwargs)

    def tool_reply(self, req: CompletionRequest):
        """What Reply needs to read tool calls out of the replies (None: the replies are text)."""
        if not req.chat or req.tools is None or not req.tools.active:
            return None
        return self.chat_template.tool_format, self.chat_template.stop_ids | self.engine.core.eos_ids, req.tools.legacy


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


def build_app(service: Service, api_key: str | None = None):
    """The ASGI application serving `service`: starlette's routes inside the last-resort exception handler;
    with `api_key`, behind the middleware that answers 401 to requests without it (edgemoe/server/auth.py)."""
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
        channel = Channel(asyncio.get_running_loop())  # (choice index, event)

        def emit_for(index: int):
            def emit(event: dict) -> None:  # engine thread → event loop
                channel.put((index, event))

            return emit

        try:
            req = parse_request(body, chat)
            # one job per choice; tokenizing 8 MB takes seconds: off the loop
            jobs, prompt_tokens, echoes = await asyncio.to_thread(make_jobs, service, req, emit_for)
            submit_all(engine, jobs)
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
        reply = Reply(service.model_name, service.tokenizer, chat, len(jobs),
                      top_logprobs=req.top_logprobs if req.logprobs else None, echoes=echoes if req.echo else None,
                      include_usage=req.stream and req.include_usage, tools=service.tool_reply(req))
        reply.prompt_tokens = prompt_tokens
        if req.stream:
            return StreamingResponse(_sse(service, jobs, channel, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def watch() -> None:  # the client hanging up ends the request at the engine's next step
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for job in jobs:
                engine.cancel(job)
            channel.put((None, {"type": "disconnected"}))

        watcher = asyncio.create_task(watch())
        try:
            while True:
                for index, event in await channel.get():
                    if event["type"] == "disconnected":
                        noise.note("client hang-ups", "a client hung up waiting for its reply; request %d cancelled",
                                   jobs[0].id)
                        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
                    if event["type"] == "error":
                        return _reply(_engine_error(service, jobs[index], event))
                    reply.add(index, event)
                    if reply.finished:
                        return JSONResponse(reply.final())
        finally:
            watcher.cancel()
            for job in jobs:  # the client left, or one choice failed: the others end too
                if not job.done:
                    engine.cancel(job)

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    def model_card() -> dict:
        return {"id": service.model_name, "object": "model", "created": int(engine.metrics.started),
                "owned_by": "edgemoe", "context_length": service.n_ctx,
                "chat_template": service.chat_template.origin}  # "model" | "file" | "plain"

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:  # the client's models.retrieve(id)
        model_id = request.path_params["model_id"]
        if model_id != service.model_name:
            return _error(404, f"the model '{model_id}' does not exist here; this server serves "
                               f"'{service.model_name}' (GET /v1/models)", "model")
        return JSONResponse(model_card())

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
              Route("/v1/models/{model_id:path}", model, methods=["GET"]),
              Route("/tokenize", route(tokenize, service), methods=["POST"]),
              Route("/detokenize", route(detokenize, service), methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = LastResort(lambda on_exception: Starlette(routes=routes, exception_handlers={
        Exception: on_exception, HTTPException: http_error}))
    return app if api_key is None else ApiKeyAuth(app, api_key, noise)


def _cache_figures(model) -> dict | None:
    experts = getattr(model, "experts", None)
    if experts is None or not hasattr(experts, "stats"):
        return None
    st = experts.stats()
    io = st["io"]
    return {"hit_rate": st["cache"]["hit_rate"], "hits": st["cache"]["hits"], "misses": st["cache"]["misses"],
            "bytes_read": io["bytes_read"], "read_retries": io["retries"],
            "recovered_reads": io["recovered_reads"], "failed_reads": io["errors"]}


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(service: Service, jobs: list[Job], channel: Channel, reply: Reply):
    """Server-sent events: a chunk per token of each choice (interleaved as they come), a last chunk per choice
    with its finish_reason, the usage (in a chunk of its own with stream_options.include_usage, else in the
    last choice's last chunk), then [DONE]. The events that arrived together go out in one write."""
    engine = service.engine
    finished = False  # the reply ran to its end (else the client went away, or the server is stopping)
    try:
        echo = [_data(reply.chunk(c.index, [], text=c.echo)) for c in reply.choices if c.echo]  # completions' echo
        if echo:
            yield "".join(echo)
        while not finished:
            out: list[str] = []
            for index, event in await channel.get():
                finished = _sse_event(service, jobs, reply, index, event, out)
                if finished:
                    break
            if out:  # (tokens of a tool call are held back until it is complete)
                yield "".join(out)
            if not finished:
                await asyncio.sleep(STREAM_INTERVAL_S)
    finally:
        unfinished = [job for job in jobs if not job.done]
        if unfinished:  # the client went away (the stream was cancelled), the server is stopping, or a choice failed
            if not finished:
                service.noise.note("client hang-ups", "a client hung up during its streamed reply; request %d "
                                   "cancelled", jobs[0].id)
            for job in unfinished:
                engine.cancel(job)


def _sse_event(service: Service, jobs: list[Job], reply: Reply, index: int, event: dict, out: list[str]) -> bool:
    """Append to `out` what choice `index`'s `event` sends; True once the stream is over."""
    if event["type"] == "token":
        out.extend(_data(body) for body in reply.token_chunks(index, event))
        return False
    if event["type"] == "error":
        out.append(_data(_engine_error(service, jobs[index], event).body()))
        out.append("data: [DONE]\n\n")
        return True
    reply.add(index, event)
    out.extend(_data(body) for body in reply.end_chunks(index))
    last = reply.chunk(index, [], finish_reason=reply.finish_reason(reply.choices[index]))
    if not reply.finished:
        out.append(_data(last))
        return False
    if reply.include_usage:
        out.append(_data(last))
        out.append(_data(reply.usage_chunk()))
    else:
        out.append(_data({**last, "usage": reply.usage()}))
    out.append("data: [DONE]\n\n")
    return True
