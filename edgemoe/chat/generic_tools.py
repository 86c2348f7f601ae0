"""Tool calls for templates that know none (llama.cpp's generic format): the tools and the reply's JSON shape go
into a system message, and past calls and tool results are written into the conversation as JSON.

    messages = generic_messages(messages, tools, parallel=False, auto=True)
    # the reply is then {"tool_call": {"name": ..., "arguments": {...}}} or {"response": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .tool_formats import Generic, Tool


def generic_messages(messages: Sequence[dict], tools: Sequence[Tool], *, parallel: bool, auto: bool) -> list[dict]:
    """`messages` with the tools described in the (first) system message and the tool turns as JSON text."""
    schema = Generic.schema(tools, parallel, auto)
    listed = [{"name": t.name, "parameters": t.parameters} for t in tools]
    key = "tool_calls" if parallel else "tool_call"
    how = (f"either with `{key}` (a request to call tools) or with `response` (your reply to the user's request)"
           if auto else f"with `{key}`, a request to call tools")
    instructions = (f"You can call these tools:\n{json.dumps(listed, ensure_ascii=False)}\n\n"
                    f"Respond in JSON format, {how}, following this schema:\n{json.dumps(schema, ensure_ascii=False)}")
    out = [_plain_turn(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out


def _plain_turn(m: dict) -> dict:
    """A message the template can render without tool support: calls as the JSON the model would write, results
    as a user turn holding {"tool_response": ...} (llama.cpp's polyfills)."""
    if m.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        body = {"tool_call": calls[0]} if len(calls) == 1 else {"tool_calls": calls}
        return {"role": m["role"], "content": json.dumps(body, ensure_ascii=False)}
    if m["role"] == "tool":
        response = {"tool": m.get("name", ""), "content": m.get("content", "")}
        if m.get("tool_call_id"):
            response["id"] = m["tool_call_id"]
        return {"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)}
    return {"role": m["role"], "content": m.get("content", "")}
