"""The last resort for exceptions no route handled: the client gets a JSON 500 with an id and a generic message
(exception texts name files and directories of the server), the log gets the traceback under that id: in full
the first time an exception of its type is raised at its place, then one line each (a client repeating the
request that hits a bug must not flood the log).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse

from .schemas import RequestError

log = logging.getLogger("edgemoe.server")


def new_error_id() -> str:
    return "err-" + uuid.uuid4().hex[:12]


def internal_error(error_id: str) -> RequestError:
    """Every 500 the client sees: that it happened and its id, without any detail of the server."""
    return RequestError(f"internal server error (id {error_id}); the server log has the details under this id",
                        None, 500)


class LastResort:
    """ASGI wrapper around the starlette app. Starlette answers an unhandled exception through `on_exception` (its
    handler for Exception) and then re-raises it; it ends here rather than in uvicorn, which would log the
    traceback a second time and answer in plain text."""

    def __init__(self, make_app: Callable[[Callable], Callable]):
        """make_app(on_exception) → the starlette app, with on_exception as its Exception handler."""
        self._seen: set[tuple[str, str, int]] = set()  # (type, file, line) whose traceback is in the log already
        self.app = make_app(self.on_exception)

    async def on_exception(self, request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        exc.edgemoe_error_id = error_id  # marks it as logged, for __call__
        self._log(error_id, f"{request.method} {request.url.path}", exc)
        return _response(error_id)

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def send_watched(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except Exception as exc:  # noqa: BLE001 - the last resort: logged, answered generically
            error_id = getattr(exc, "edgemoe_error_id", None)
            if error_id is None:
                error_id = new_error_id()
                self._log(error_id, f"{scope.get('method')} {scope.get('path')}", exc)
            if scope["type"] == "http" and not started:
                await _response(error_id)(scope, receive, send)

    def _log(self, error_id: str, what: str, exc: BaseException) -> None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (type(exc).__name__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
        if where in self._seen:
            log.error("%s: %s failed: %s: %s (traceback logged before)", error_id, what, type(exc).__name__, exc)
        else:
            self._seen.add(where)
            log.error("%s: %s failed", error_id, what, exc_info=exc)


def _response(error_id: str) -> JSONResponse:
    return JSONResponse(internal_error(error_id).body(), status_code=500)
