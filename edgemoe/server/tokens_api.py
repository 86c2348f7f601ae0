"""POST /tokenize and POST /detokenize in llama-server's shapes.

    /tokenize   {"content": "text"} (or "prompt"), "add_special": false, "with_pieces": false → {"tokens": [ids]}
                (with_pieces: [{"id", "piece"}], the piece being the token's text, as logprobs give it)
    /detokenize {"tokens": [ids]} → {"content": "text"}
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import EdgeMoEError
from .body import decode_json, read_body
from .checks import RequestError, check, is_int, show
from .token_text import escaped_text


async def _body(request: Request, service) -> dict:
    body = decode_json(await read_body(request, service.limits), service.limits)
    check(isinstance(body, dict), "body", "a JSON object", body)
    if service.tokenizer is None:
        raise RequestError("this model carries no vocabulary: it reads and writes token ids only", None)
    return body


async def tokenize(request: Request, service) -> dict:
    """The body of /tokenize's reply; RequestError names the field."""
    body = await _body(request, service)
    name = "content" if "content" in body else "prompt"
    text, add_special, pieces = body.get(name), body.get("add_special", False), body.get("with_pieces", False)
    check(isinstance(text, str), name, "a string (the text to tokenize)", text)
    check(isinstance(add_special, bool), "add_special", "true or false", add_special)
    check(isinstance(pieces, bool), "with_pieces", "true or false", pieces)
    tok = service.tokenizer
    # add_special: BOS when the vocabulary asks for it, as llama-server; tokenizing megabytes: off the loop
    ids = await asyncio.to_thread(tok.encode, text, None if add_special else False)
    if pieces:
        return {"tokens": [{"id": i, "piece": escaped_text(tok.token_bytes(i), legacy=False)} for i in ids]}
    return {"tokens": ids}


async def detokenize(request: Request, service) -> dict:
    body = await _body(request, service)
    ids = body.get("tokens")
    vocab = service.tokenizer.vocab_size
    check(isinstance(ids, list) and all(is_int(t) for t in ids), "tokens", "a list of token ids", ids)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"'tokens' holds {show(bad[0])}, outside the vocabulary (0..{vocab - 1})", "tokens")
    return {"content": await asyncio.to_thread(service.tokenizer.decode, ids)}


def route(handler, service):
    """A starlette endpoint answering handler(request, service)'s body as JSON, a RequestError in OpenAI's shape."""

    async def endpoint(request: Request) -> Response:
        try:
            return JSONResponse(await handler(request, service))
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except EdgeMoEError as e:  # text or ids the tokenizer refuses
            return JSONResponse(RequestError(str(e)).body(), status_code=400)
        except ClientDisconnect:
            return Response(status_code=499)

    return endpoint
