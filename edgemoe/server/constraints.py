"""Constraints on the reply's form a request may ask for: `response_format` (JSON, a JSON schema) and tool calls
(`tools`/`tool_choice`, the older `functions`/`function_call`).

edgemoe writes free text only, for now: `output_constraint` returns None (no constraint) for a request that
asks for text, and answers 400 naming the field for one that asks for JSON or tool calls. This is where
constrained decoding plugs in: it would return a grammar here instead, `Service.make_job` would hand it to the
Request, and the sampler would mask the logits the grammar forbids (a stage after the logit bias, in `sample`
and `distribution` alike, so speculative verification sees it too).
"""

from __future__ import annotations

from .checks import RequestError, check, show

_TOOLS = "tool calls are not supported yet (they need constrained decoding)"


def output_constraint(body: dict, chat: bool) -> None:
    """The constraint `body` asks the reply to follow: None (free text), or RequestError (400) naming the field."""
    fmt = body.get("response_format")
    if fmt is not None:
        check(isinstance(fmt, dict) and isinstance(fmt.get("type"), str), "response_format",
               'an object such as {"type": "text"}', fmt)
        kind = fmt["type"]
        if kind in ("json_object", "json_schema"):
            raise RequestError(f"'response_format' {kind} is not supported yet: it needs constrained decoding (a "
                               'grammar that forces JSON); leave it out or send {"type": "text"}', "response_format")
        if kind != "text":
            raise RequestError(f"'response_format' type {show(kind)} is not one of text, json_object, json_schema",
                               "response_format.type")
    if not chat:
        return None
    for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        defined, pick = body.get(tools), body.get(choice)
        check(defined is None or isinstance(defined, list), tools, "a list", defined)
        check(pick is None or isinstance(pick, (str, dict)), choice, '"none", "auto", "required" or an object', pick)
        if pick == "none":
            continue  # the model is told not to call any: plain text, whatever tools are listed
        if isinstance(pick, dict) or pick == "required":
            raise RequestError(f"'{choice}' {show(pick)}: {_TOOLS}; leave '{choice}' out or send \"none\"", choice)
        check(pick in (None, "auto"), choice, '"none", "auto", "required" or an object', pick)
        if defined:
            raise RequestError(f"'{tools}': {_TOOLS}; leave '{tools}' out or send '{choice}': \"none\"", tools)
    return None
