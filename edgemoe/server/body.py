"""A request's body: read within the size and time limits whatever the headers claim (chunked, or a
Content-Length that lies), then decoded as JSON within the depth and number limits, every string valid Unicode.

Each failure is a RequestError: 413 (too large), 408 (too slow), 400 naming the field (bad JSON).
"""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import aclosing
from typing import Any

from .limits import HttpLimits
from .schemas import RequestError


async def read_body(request, limits: HttpLimits) -> bytes:
    """The whole body of a starlette `request`; stops reading at the first byte beyond `max_body_bytes`.

    Raises starlette's ClientDisconnect when the client goes away while sending it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)  # refused before reading a byte
    try:
        return await asyncio.wait_for(_read(request, limits), limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {limits.read_timeout_s:g} s; send the whole "
                           "body at once", None, 408) from None


async def _read(request, limits: HttpLimits) -> bytes:
    body = bytearray()
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:  # uvicorn buffers at most ~64 KB ahead of us (flow control)
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise _too_large(limits)
    return bytes(body)


def _too_large(limits: HttpLimits) -> RequestError:
    return RequestError(f"the request body must be at most {limits.max_body_bytes} bytes", None, 413)


class _BadNumber:
    """What the decoder puts in place of a number Python should not build; reported with its field's name."""

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


def decode_json(raw: bytes, limits: HttpLimits) -> Any:
    """The decoded body; RequestError (400) for malformed JSON, too deep nesting, NaN/Infinity, integers of more
    than `max_int_digits` digits, and strings holding lone surrogates (escaped "\\ud800": not Unicode text)."""
    digits = limits.max_int_digits

    def parse_int(s: str):  # before int(s): Python refuses > 4300 digits with ValueError, and big ones cost time
        n = len(s) - (s[0] == "-")
        return int(s) if n <= digits else _BadNumber(s, f"a {n}-digit integer; integers have at most {digits} digits")

    def parse_constant(s: str):
        return _BadNumber(s, "not a JSON number; send a finite number")

    try:
        body = json.loads(raw, parse_int=parse_int, parse_constant=parse_constant)
    except RecursionError:  # the C decoder recurses once per level: ~1,000 levels end here
        raise _too_deep(limits, _deep_field(raw, limits.max_json_depth)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from None
    _check_tree(body, limits)
    return body


def _too_deep(limits: HttpLimits, field: str | None) -> RequestError:
    where = f" (in '{field}')" if field else ""
    return RequestError(f"the JSON body is nested more than {limits.max_json_depth} levels deep{where}", field)


_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a string, or a bracket


def _deep_field(raw: bytes, max_depth: int, max_tokens: int = 1 << 20) -> str | None:
    """The top-level field whose value nests beyond `max_depth`, for a body too deep to decode; None if unknown."""
    depth, key = 0, None
    for i, m in enumerate(_TOKENS.finditer(raw.decode("utf-8", "replace"))):
        t = m.group()
        if i > max_tokens:
            return None
        if t[0] == '"':
            key = t if depth == 1 else key  # in the top-level object, the last string before a '[' or '{' is its key
        elif t in "[{":
            depth += 1
            if depth > max_depth:
                try:
                    return _show(json.loads(key)) if key else None
                except ValueError:  # an escape the decoder did not accept (it failed on the depth first)
                    return None
        else:
            depth -= 1
            key = None if depth <= 1 else key
    return None


def _check_tree(body: Any, limits: HttpLimits) -> None:
    """Walk the decoded body without recursion; `path` names a field as the errors do (messages[0].content),
    `top` the top-level field it is in."""
    stack: list[tuple[Any, str, str | None, int]] = [(body, "", None, 1)]
    while stack:
        obj, path, top, depth = stack.pop()
        if isinstance(obj, str):
            _check_text(obj, f"'{path}'" if path else "the body", path or None)
        elif isinstance(obj, _BadNumber):
            raise RequestError(f"'{path or 'body'}' is {_show(obj.text)}: {obj.why}", path or None)
        elif isinstance(obj, (dict, list)):
            if depth > limits.max_json_depth:
                raise _too_deep(limits, top)
            if isinstance(obj, dict):
                for key, v in obj.items():
                    _check_text(key, f"a key in '{path}'" if path else "a field name", path or None)
                    stack.append((v, f"{path}.{key}" if path else key, top or key, depth + 1))
            elif not all(type(v) is int for v in obj):  # a list of token ids: nothing more to look at
                stack.extend((v, f"{path}[{i}]", top, depth + 1) for i, v in enumerate(obj))


def _check_text(s: str, what: str, param: str | None) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} holds a lone UTF-16 surrogate (\\u{ord(s[e.start]):04x} at character {e.start}), "
                           "which is not Unicode text; send characters beyond U+FFFF as a surrogate pair or as UTF-8",
                           param) from None


def _show(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}...{text[-10:]}"
