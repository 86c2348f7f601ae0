"""OpenAI-shaped bodies from engine events: whole replies and stream chunks, for one choice or several.

A request's choices (n per prompt, one prompt or a list) are engine requests of their own; each event
arrives with its choice's index, and the reply lists choices by index. Usage counts each prompt once
(n choices share it) and every choice's generated tokens.
"""

from __future__ import annotations

import time
import uuid

from .token_text import TokenTexts
from .tool_reply import ToolSplitter, tool_calls_json


class Choice:
    """One choice's text and logprob state as its tokens arrive."""

    def __init__(self, index: int, tokenizer, echo: str):
        self.index = index
        self.echo = echo  # completions with echo: the prompt's text, before the completion's
        self.texts = TokenTexts(tokenizer, offset=len(echo))
        self.text: list[str] = []
        self.events: list[dict] = []
        self.done: dict | None = None  # the engine's "done" event once the choice has ended
        self.splitter: ToolSplitter | None = None  # a chat reply that may call tools
        self.calls: list = []  # its tool calls (edgemoe.chat.tool_formats.ToolCall), read when it ended
        self.started = False  # a stream's first chunk went out (in chat, it carries the role)


class Reply:
    """Builds the response bodies of one request from its choices' events."""

    def __init__(self, model_name: str, tokenizer, chat: bool, n_choices: int, *, top_logprobs: int | None,
                 echoes: list[str] | None = None, include_usage: bool = False, tools=None):
        """top_logprobs: alternatives shown per token (None: no logprobs); echoes: each choice's echoed prompt;
        tools: (ToolFormat, end-of-turn ids, legacy) when the reply may call tools (server/tools.py)."""
        self.model_name, self.tokenizer, self.chat = model_name, tokenizer, chat
        self.top_logprobs = top_logprobs
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [Choice(i, tokenizer, echoes[i] if echoes else "") for i in range(n_choices)]
        self.prompt_tokens = 0  # set by the caller: each distinct prompt's tokens, once
        self.tool_format, self.legacy = (tools[0], tools[2]) if tools else (None, False)
        if tools:
            for c in self.choices:
                c.splitter = ToolSplitter(tools[0], tokenizer, tools[1])

    @property
    def finished(self) -> bool:
        return all(c.done is not None for c in self.choices)

    def add(self, index: int, event: dict) -> None:
        """A "token" or "done" event of choice `index` (whole replies; stream chunks come from `chunk`)."""
        c = self.choices[index]
        if event["type"] == "done":
            c.done = event
        else:
            c.text.append(event["text"])
            c.events.append(event)

    def usage(self) -> dict:
        completion = sum(c.done["completion_tokens"] for c in self.choices if c.done is not None)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    # ------------------------------------------------------------------ whole replies

    def final(self) -> dict:
        out = []
        for c in self.choices:
            text = "".join(c.text)
            logprobs = self._logprobs(c, c.events)
            if c.splitter is not None:
                released = [e for event in c.events for e in c.splitter.push(event)]
                rest, content, c.calls = c.splitter.finish()
                text = "".join(e["text"] for e in released + rest) + (content or "")
            choice = {"index": c.index, "finish_reason": self.finish_reason(c), "logprobs": logprobs,
                      "token_ids": [e["id"] for e in c.events]}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text or (None if c.calls else ""),
                                     "refusal": None, **self._calls(c)}
            else:
                choice["text"] = c.echo + text
            out.append(choice)
        return {**self._head(False), "choices": out, "usage": self.usage()}

    def finish_reason(self, c: Choice) -> str:
        if c.calls:
            return "function_call" if self.legacy else "tool_calls"
        return c.done["finish_reason"]

    def _calls(self, c: Choice, delta: bool = False) -> dict:
        if not c.calls:
            return {}
        calls = tool_calls_json(self.tool_format, c.calls, delta)
        if self.legacy:
            return {"function_call": calls[0]["function"]}
        return {"tool_calls": calls}

    # ------------------------------------------------------------------ streams

    def token_chunks(self, index: int, event: dict) -> list[dict]:
        """The chunks to send for a token event of choice `index` (none while it may be part of a tool call)."""
        c = self.choices[index]
        events = [event] if c.splitter is None else c.splitter.push(event)
        return [self._content_chunk(c, events)] if events else []

    def end_chunks(self, index: int) -> list[dict]:
        """The chunks choice `index` still owes once it has ended (held content, its tool calls), before the last."""
        c = self.choices[index]
        if c.splitter is None:
            return []
        events, content, c.calls = c.splitter.finish()
        out = [self._content_chunk(c, events)] if events else []
        if content:
            out.append(self._content_chunk(c, [], text=content))
        if c.calls:
            body = self.chunk(index, [], first=not c.started)
            delta = body["choices"][0]["delta"]
            delta.pop("content", None)
            delta.update(self._calls(c, delta=True))
            c.started = True
            out.append(body)
        return out

    def _content_chunk(self, c: Choice, events: list[dict], text: str | None = None) -> dict:
        body = self.chunk(c.index, events, first=not c.started, text=text)
        if text is not None and self.chat:
            body["choices"][0]["delta"]["content"] = text
        c.started = True
        return body

    def chunk(self, index: int, events: list[dict], finish_reason: str | None = None, first: bool = False,
              text: str | None = None) -> dict:
        """A chunk of choice `index` carrying `events` (its tokens; none for the last chunk, which carries
        `finish_reason`); `first` adds the chat role; `text` replaces the events' text (the echoed prompt)."""
        c = self.choices[index]
        if text is None:
            text = "".join(e["text"] for e in events)
        choice = {"index": index, "finish_reason": finish_reason,
                  "logprobs": self._logprobs(c, events) if events else None, "token_ids": [e["id"] for e in events]}
        if self.chat:
            delta = {"content": text} if events or first else {}  # the last chunk carries finish_reason only
            choice["delta"] = {"role": "assistant", **delta} if first else delta
        else:
            choice["text"] = text
        body = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null in every chunk but the usage chunk
        return body

    def usage_chunk(self) -> dict:
        """stream_options.include_usage: the last chunk, with no choices and the whole request's usage."""
        return {**self._head(True), "choices": [], "usage": self.usage()}

    # ------------------------------------------------------------------ logprobs

    def _logprobs(self, c: Choice, events: list[dict]) -> dict | None:
        """The logprobs of choice `c`'s `events` (the next ones of its reply, in order), in OpenAI's shape for
        the endpoint; the engine's ids ride along as `id`/`token_ids` (an edgemoe extension)."""
        if self.top_logprobs is None:
            return None
        k = self.top_logprobs
        legacy = not self.chat
        entries = []
        for e in events:
            alts = [(i, lp, c.texts.bytes_of(i), c.texts.text_of(i, legacy)) for i, lp in e["top"][:k]]
            text = c.texts.text_of(e["id"], legacy)
            b, offset = c.texts.push(e["id"])
            entries.append((e, text, b, offset, alts))
        if self.chat:
            return {"content": [{"token": text, "logprob": e["logprob"], "bytes": _ints(b), "id": e["id"],
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": _ints(ab), "id": i}
                                                  for i, lp, ab, t in alts]}
                                for e, text, b, _, alts in entries],
                    "refusal": None}
        tops = []
        for e, text, _, _, alts in entries:
            top: dict[str, float] = {}
            for _, lp, _, t in alts:
                top.setdefault(t, lp)
            top.setdefault(text, e["logprob"])  # "up to logprobs + 1 elements": the chosen token is always there
            tops.append(top)
        return {"tokens": [text for _, text, _, _, _ in entries],
                "token_logprobs": [e["logprob"] for e, *_ in entries],
                "top_logprobs": tops,
                "text_offset": [offset for _, _, _, offset, _ in entries],
                "token_ids": [e["id"] for e, *_ in entries]}


def _ints(b: bytes | None) -> list[int] | None:
    return None if b is None else list(b)
