"""The 400 every bad field gets (OpenAI's error shape), and the small checks the request parsers share."""

from __future__ import annotations

import math
from typing import Any


class RequestError(ValueError):
    """A bad request; `param` names the field, `status` the HTTP code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status

    def body(self) -> dict:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.status}}


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check(cond: bool, name: str, what: str, value: Any) -> None:
    """RequestError "'name' must be what, got value" unless `cond`."""
    if not cond:
        raise RequestError(f"'{name}' must be {what}, got {show(value)}", name)


def show(value: Any) -> str:
    """The offending value for an error message, cut short: it may be megabytes long."""
    return cut(repr(value))


def cut(s: str, limit: int = 60) -> str:
    return s if len(s) <= limit else s[:limit - 3] + "..."
