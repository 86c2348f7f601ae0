"""Tool calls in a chat request: `tools` and `tool_choice` (and the older `functions` / `function_call`), and
the past calls and tool results in `messages`, checked and turned into what the template renders.

`tool_choice` "auto" (the default when tools are given) lets the model answer or call; "required" or
{"type": "function", "function": {"name": N}} constrains the reply to calls (edgemoe.chat.tool_formats); "none"
renders the tools but reads the reply as text. `parallel_tool_calls` defaults to false as llama.cpp's server
(one call per constrained reply; a free reply's calls are all read).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..chat.tool_formats import Tool
from .checks import RequestError, check, show

MAX_TOOLS = 128
_NAME = re.compile(r"^[a-zA-Z0-9_.\-]{1,64}$")  # OpenAI's function names (plus "." as llama.cpp)
_ANY_ARGS = {"type": "object"}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: str  # "auto" | "required" | "none"
    named: str | None = None  # the function tool_choice names (choice is then "required")
    parallel: bool = False
    legacy: bool = False  # asked with `functions`: the reply carries `function_call`

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def constrained_tools(self) -> tuple[Tool, ...]:
        """The tools a constrained reply may call."""
        return tuple(t for t in self.tools if self.named is None or t.name == self.named)

    def listed(self) -> list[dict]:
        """The tools as the chat template receives them (OpenAI's shape, as transformers passes them)."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in self.tools]


def parse_tools(body: dict) -> ToolRequest | None:
    """The request's tools (None: none given); RequestError naming the field."""
    if body.get("tools") is not None and body.get("functions") is not None:
        raise RequestError("send 'tools' or the older 'functions', not both", "functions")
    legacy = body.get("tools") is None and body.get("functions") is not None
    field, choice_field = ("functions", "function_call") if legacy else ("tools", "tool_choice")
    raw, pick = body.get(field), body.get(choice_field)
    parallel = body.get("parallel_tool_calls")
    check(parallel is None or isinstance(parallel, bool), "parallel_tool_calls", "true or false", parallel)
    if raw is None:
        check(pick in (None, "none", "auto"), choice_field, f"\"none\" or \"auto\" without '{field}'", pick)
        return None
    check(isinstance(raw, list) and len(raw) <= MAX_TOOLS, field, f"a list of up to {MAX_TOOLS} tools", raw)
    tools: list[Tool] = []
    for i, entry in enumerate(raw):
        tool = _function(entry, f"{field}[{i}]", legacy)
        if any(t.name == tool.name for t in tools):
            raise RequestError(f"'{field}' names the function {show(tool.name)} twice", f"{field}[{i}]")
        tools.append(tool)
    choice, named = _choice(pick, choice_field, legacy)
    if named is not None and not any(t.name == named for t in tools):
        raise RequestError(f"'{choice_field}' names {show(named)}, which is not in '{field}'", choice_field)
    if choice == "required" and not tools:
        raise RequestError(f"'{choice_field}' asks for a call and '{field}' is empty", choice_field)
    return ToolRequest(tuple(tools), choice, named, bool(parallel), legacy)


def _function(entry: Any, name: str, legacy: bool) -> Tool:
    if not legacy:
        check(isinstance(entry, dict) and entry.get("type") == "function", name,
              '{"type": "function", "function": {"name": ..., "parameters": {...}}}', entry)
        entry, name = entry.get("function"), f"{name}.function"
    check(isinstance(entry, dict), name, 'an object with "name" and "parameters"', entry)
    fn = entry.get("name")
    check(isinstance(fn, str) and _NAME.match(fn) is not None, f"{name}.name",
          "1 to 64 letters, digits, '_', '-' or '.'", fn)
    params = entry.get("parameters", _ANY_ARGS)
    check(isinstance(params, dict), f"{name}.parameters", "a JSON schema object", params)
    description = entry.get("description", "")
    check(isinstance(description, str), f"{name}.description", "a string", description)
    strict = entry.get("strict")
    check(strict is None or isinstance(strict, bool), f"{name}.strict", "true or false", strict)
    return Tool(fn, params, description)


def _choice(pick: Any, field: str, legacy: bool) -> tuple[str, str | None]:
    if pick is None:
        return "auto", None
    if pick in ("none", "auto") or (pick == "required" and not legacy):
        return pick, None
    what = '"none", "auto" or {"name": ...}' if legacy else \
        '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    if isinstance(pick, dict):
        inner = pick if legacy else pick.get("function") if pick.get("type") == "function" else None
        if isinstance(inner, dict) and isinstance(inner.get("name"), str):
            return "required", inner["name"]
    raise RequestError(f"'{field}' must be {what}, got {show(pick)}", field)


def history_message(m: dict, name: str) -> dict:
    """The tool parts of a past message as templates read them: an assistant's `tool_calls` (arguments parsed
    into objects, as transformers' templates expect) or `function_call`, a tool result's `tool_call_id`/`name`."""
    out: dict = {}
    calls = m.get("tool_calls")
    if calls is None and m.get("function_call") is not None:
        calls = [{"id": "", "type": "function", "function": m["function_call"]}]
        name = f"{name}.function_call"
    else:
        name = f"{name}.tool_calls"
    if calls is not None:
        check(isinstance(calls, list), name, "a list of tool calls", calls)
        out["tool_calls"] = [_past_call(c, f"{name}[{j}]") for j, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            check(isinstance(m[key], str), f"{name.rsplit('.', 1)[0]}.{key}", "a string", m[key])
            out[key] = m[key]
    return out


def _past_call(c: Any, name: str) -> dict:
    check(isinstance(c, dict) and isinstance(c.get("function"), dict), name,
          '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}', c)
    fn = c["function"]
    check(isinstance(fn.get("name"), str), f"{name}.function.name", "a string", fn.get("name"))
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RequestError(f"'{name}.function.arguments' must be JSON text, got {show(args)}",
                               f"{name}.function.arguments") from None
    check(isinstance(args, dict), f"{name}.function.arguments", "a JSON object", args)
    ident = c.get("id") or ""
    check(isinstance(ident, str), f"{name}.id", "a string", ident)
    return {"id": ident, "type": "function", "function": {"name": fn["name"], "arguments": args}}
