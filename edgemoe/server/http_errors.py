"""starlette's own 404 (no such route) and 405 (wrong method) in OpenAI's error shape instead of plain text."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from .checks import RequestError


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    path = request.url.path
    if exc.status_code == 404:
        message = f"no route {request.method} {path}; the API is under /v1 (GET /v1/models lists the model)"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {path}; use {allowed or 'another method'}"
    else:
        message = exc.detail
    return JSONResponse(RequestError(message, None, exc.status_code).body(), status_code=exc.status_code,
                        headers=exc.headers)
