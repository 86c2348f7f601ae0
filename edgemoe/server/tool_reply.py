"""A chat reply that may call tools: content tokens go out as they come, the calls are held and read at the end.

Each token's text is followed with special tokens shown (Mistral's "[TOOL_CALLS]" and gpt-oss's channels are
control tokens). Tokens that cannot be part of a call are released as content at once; from the format's trigger
on ("<tool_call>", "[TOOL_CALLS]", ...), or for the whole reply when the format is one JSON value, they are held.
When the reply ends the held text is parsed (edgemoe.chat.tool_formats): calls become OpenAI's `tool_calls`, a
generic {"response": ...} becomes the content, and anything that does not parse is released as content.
"""

from __future__ import annotations

import secrets
import string

from ..chat.tool_formats import ToolCall, ToolFormat

_ALNUM = string.ascii_letters + string.digits
_PYTHON_TAG = "<|python_tag|>"


class ToolSplitter:
    """One choice's tokens → content events now, and (content, calls) at the end."""

    def __init__(self, fmt: ToolFormat, tokenizer, ends: frozenset[int]):
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.ends = ends  # end-of-turn ids: their text is not part of the reply
        self.pieces: list[str] = []  # each token's text with special tokens shown
        self.text = ""  # their concatenation, grown a piece at a time
        self.held: list[dict] = []  # token events not yet released as content
        self.calling = False  # the trigger appeared: everything from it on is held

    def push(self, event: dict) -> list[dict]:
        """The token events that can be released as content after `event`."""
        tid = event["id"]
        piece = "" if tid in self.ends else self.tokenizer.token_bytes(tid, special=True).decode("utf-8", "replace")
        self.pieces.append(piece)
        self.text += piece
        self.held.append(event)
        if self.calling or self.fmt.generic:
            return []
        text = self.text
        trigger = self.fmt.trigger
        if trigger is None:  # the reply is the calls' JSON if it starts as JSON (or Llama's python tag)
            start = text.lstrip()
            if start == "" or _PYTHON_TAG.startswith(start):
                return []  # not decided yet
            if start[0] == "{" or start.startswith(_PYTHON_TAG):
                self.calling = True
                return []
            return self._release(len(self.held))
        if trigger == "":
            self.calling = True
            return []
        at = text.find(trigger)
        if at >= 0:
            self.calling = True
            return self._release(self._token_at(at))
        keep = _partial_suffix(text, trigger)
        return self._release(self._token_at(len(text) - keep) if keep else len(self.held))

    def finish(self) -> tuple[list[dict], str | None, list[ToolCall]]:
        """(events released as content, content text of the call reply, the calls) once the reply has ended.
        With no calls, the events carry the content (the text is None); a generic answer is the text."""
        if not self.held:
            return [], None, []
        if self.fmt.generic or self.calling:
            text = "".join(self.pieces[len(self.pieces) - len(self.held):])
            parsed = self.fmt.parse(text)
            if parsed is not None:
                content, calls = parsed
                self.held = []
                return [], content, calls
        events, self.held = self.held, []
        return events, None, []

    def _release(self, n: int) -> list[dict]:
        """The first `n` held events, released."""
        out, self.held = self.held[:n], self.held[n:]
        return out

    def _token_at(self, char: int) -> int:
        """How many held tokens end at or before character `char` of the held text."""
        pos = sum(len(p) for p in self.pieces[:len(self.pieces) - len(self.held)])
        for k, p in enumerate(self.pieces[len(self.pieces) - len(self.held):]):
            if pos + len(p) > char:
                return k
            pos += len(p)
        return len(self.held)


def _partial_suffix(text: str, trigger: str) -> int:
    """Length of the longest end of `text` that begins `trigger` (the trigger may be on its way)."""
    for k in range(min(len(trigger) - 1, len(text)), 0, -1):
        if trigger.startswith(text[-k:]):
            return k
    return 0


def call_id(fmt: ToolFormat, call: ToolCall) -> str:
    """The call's id: the model's own (Mistral writes one), else a fresh one of the form its template accepts
    (Mistral's templates want 9 letters and digits)."""
    if call.id:
        return call.id
    if fmt.name.startswith("mistral"):
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def tool_calls_json(fmt: ToolFormat, calls: list[ToolCall], delta: bool = False) -> list[dict]:
    """OpenAI's `tool_calls` (a stream's delta entries carry their `index`)."""
    out = []
    for i, c in enumerate(calls):
        entry = {"id": call_id(fmt, c), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": i, **entry} if delta else entry)
    return out
