"""How a model family writes tool calls: which format a chat template uses, the grammar that forces a call, and
the parser that reads calls back out of a reply.

A template that lists tools and writes an assistant's `tool_calls` teaches its model one text format; the
reply is parsed in that format (vLLM's tool parsers and llama.cpp's common/chat.cpp name the same ones):

    hermes        <tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>      Qwen2.5, Qwen3, Hermes
    llama3_json   {"name": N, "parameters": {...}}                                  Llama 3.1-3.3
    mistral       [TOOL_CALLS][{"name": N, "arguments": {...}, "id": "abcdefghi"}]  Mistral-Nemo, 7B v0.3
    mistral_args  [TOOL_CALLS]N[CALL_ID]id[ARGS]{...}                               Mistral-Small 3.2, Devstral
    deepseek      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...  DeepSeek-V3.x
    harmony       <|channel|>commentary to=functions.N <|constrain|>json<|message|>{...}<|call|>  gpt-oss
    generic       {"tool_call": {"name": N, "arguments": {...}}} or {"response": "..."}  any other template

`generic` is llama.cpp's format for templates that know no tool calls (the plain format of the default model
among them): the tools are described in a system message (edgemoe.chat.generic_tools) and the whole reply is
JSON, constrained by a grammar. The others are free text until the model starts a call; `tool_choice`
"required" or a named function constrains the reply to calls in the format, with JSON laid out as the template
writes it (", " and ": ", as `tojson`). tests/test_tool_calls.py parses what transformers renders for an
assistant's tool calls with each family's real template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .end_of_turn import control_id

# JSON as the templates write it (tojson / json.dumps defaults): the layout the model was trained on
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI's `function.arguments`
    id: str | None = None  # the id the model wrote (Mistral), else the server makes one


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # JSON schema of the arguments
    description: str = ""


class ToolFormat:
    """One family's tool-call text. `trigger`: the text that starts the calls (None: the whole reply is the
    calls' JSON, as in llama3_json and generic; "" : the whole reply is held, harmony's channels)."""

    name = ""
    trigger: str | None = None
    generic = False  # tools go into a system message and the reply is always JSON

    def parse(self, text: str) -> tuple[str, list[ToolCall]] | None:
        """(content before the calls, the calls) of a reply written with special tokens shown; None when it
        holds no well-formed call (the reply is then plain content)."""
        raise NotImplementedError

    def grammar(self, tools: Sequence[Tool], tokenizer, parallel: bool, auto: bool = False) -> str:
        """A Lark grammar (llguidance) for a reply that is one call (parallel: one or more) to one of `tools`.
        `auto` (generic only): a reply that may also be an answer."""
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = [f"start: {self._begin(tokenizer)} call{self._repeat(tokenizer) if parallel else ''} "
                 f"{self._end(tokenizer)}", f"call: {calls}"]
        rules += [f"call_{i}: {self._call(t, tokenizer)}" for i, t in enumerate(tools)]
        return "\n".join(rules)

    def _begin(self, tokenizer) -> str:
        return ""

    def _end(self, tokenizer) -> str:
        return ""

    def _repeat(self, tokenizer) -> str:
        return " call*"

    def _call(self, tool: Tool, tokenizer) -> str:
        raise NotImplementedError


def lark_text(tokenizer, *parts: str) -> str:
    """Lark terminals for `parts` in order: a part that is one control token of the vocabulary is that token
    (`<[id]>`: it writes no text), any other part its literal text."""
    out = []
    for p in parts:
        i = control_id(tokenizer, p) if p.startswith(("<", "[")) else None
        out.append(f"<[{i}]>" if i is not None else json.dumps(p))
    return " ".join(out)


def json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _LAYOUT})


def _object_args(value) -> str | None:
    """`arguments` as JSON text of an object (a model may write the object, or a string holding it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _named_call(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = _object_args(obj.get(args_key, obj.get("arguments", {})))
    ident = obj.get("id") if isinstance(obj.get("id"), str) else None
    return None if args is None else ToolCall(obj["name"], args, ident)


def _json_values(text: str) -> list | None:
    """Consecutive JSON values in `text` (separated by whitespace, "," or ";"); None if anything else is there."""
    values, at = [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,;":
            at += 1
        if at == len(text):
            return values
        try:
            value, at = _DECODER.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


class Hermes(ToolFormat):
    name, trigger = "hermes", "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def parse(self, text):
        at = text.find(self.trigger)
        if at < 0:
            return None
        calls = [_named_call(_json_or_none(body), "arguments") for body in self._CALL.findall(text, at)]
        if not calls or None in calls or text[at:].count(self.trigger) != len(calls):
            return None
        return text[:at].strip(), calls

    def _repeat(self, tokenizer):
        return ' ("\\n" call)*'

    def _call(self, tool, tokenizer):
        schema = {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False}
        return f'{lark_text(tokenizer, "<tool_call>")} "\\n" {json_rule(schema)} "\\n" ' \
               f'{lark_text(tokenizer, "</tool_call>")}'


class Llama3Json(ToolFormat):
    name, trigger = "llama3_json", None
    _TAG = "<|python_tag|>"

    def parse(self, text):
        body = text.strip()
        body = body[len(self._TAG):] if body.startswith(self._TAG) else body
        if not body.startswith("{"):
            return None
        values = _json_values(body)
        calls = [_named_call(v, "parameters") for v in values or []]
        return ("", calls) if calls and None not in calls else None

    def _repeat(self, tokenizer):
        return ' ("; " call)*'

    def _call(self, tool, tokenizer):
        schema = {"type": "object", "properties": {"name": {"const": tool.name}, "parameters": tool.parameters},
                  "required": ["name", "parameters"], "additionalProperties": False}
        return json_rule(schema)


class Mistral(ToolFormat):
    name, trigger = "mistral", "[TOOL_CALLS]"

    def parse(self, text):
        at = text.find(self.trigger)
        if at < 0:
            return None
        values = _json_values(text[at + len(self.trigger):])
        if not values or not all(isinstance(v, list) for v in values):
            return None
        calls = [_named_call(c, "arguments") for v in values for c in v]
        return (text[:at].strip(), calls) if calls and None not in calls else None

    def grammar(self, tools, tokenizer, parallel, auto=False):
        items = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters,
                                                   "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}},
                  "required": ["name", "arguments", "id"], "additionalProperties": False} for t in tools]
        array = {"type": "array", "items": {"anyOf": items}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return f"start: {lark_text(tokenizer, self.trigger)} {json_rule(array)}"


class MistralArgs(ToolFormat):
    name, trigger = "mistral_args", "[TOOL_CALLS]"
    _CALL = re.compile(r"\[TOOL_CALLS\]([^\[\]\s]+?)(?:\[CALL_ID\]([^\[\]\s]*))?\[ARGS\]", re.S)

    def parse(self, text):
        at = text.find(self.trigger)
        if at < 0:
            return None
        calls, pos = [], at
        while pos < len(text):
            m = self._CALL.match(text, pos)
            if m is None:
                return None
            try:
                value, end = _DECODER.raw_decode(text, m.end())
            except ValueError:
                return None
            args = _object_args(value)
            if args is None:
                return None
            calls.append(ToolCall(m.group(1), args, m.group(2) or None))
            pos = end
            while pos < len(text) and text[pos] in " \n":
                pos += 1
        return text[:at].strip(), calls

    def _call(self, tool, tokenizer):
        call_id = f"({lark_text(tokenizer, '[CALL_ID]')} /[a-zA-Z0-9]{{9}}/)?"  # newer models write an id
        return f"{lark_text(tokenizer, '[TOOL_CALLS]', tool.name)} {call_id} {lark_text(tokenizer, '[ARGS]')} " \
               f"{json_rule(tool.parameters)}"


_BEGIN, _CALL_BEGIN, _SEP, _CALL_END, _END = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                               "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")


class DeepSeek(ToolFormat):
    """V3.1 and later: N<｜tool▁sep｜>{...}; V3-0324 and R1: function<｜tool▁sep｜>N\\n```json\\n{...}\\n```."""

    name, trigger = "deepseek", _BEGIN
    _CALL = re.compile(re.escape(_CALL_BEGIN) + r"(?:function" + re.escape(_SEP) + r"([^\n]+)\n```(?:json)?\n(.*?)\n```"
                       r"|(.+?)" + re.escape(_SEP) + r"(.*?))" + re.escape(_CALL_END), re.S)

    def __init__(self, fenced: bool = False):
        self.fenced = fenced  # the older form, with "function" and a fenced JSON block

    def parse(self, text):
        at = text.find(_CALL_BEGIN)
        if at < 0:
            return None
        begin = text.rfind(_BEGIN, 0, at + 1)
        content = text[:begin if begin >= 0 else at].strip()
        calls = []
        for m in self._CALL.finditer(text, at):
            name, args = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            args = _object_args(args)
            if args is None:
                return None
            calls.append(ToolCall(name.strip(), args))
        return (content, calls) if calls and len(calls) == text.count(_CALL_BEGIN, at) else None

    def _begin(self, tokenizer):
        return lark_text(tokenizer, _BEGIN)

    def _end(self, tokenizer):
        return lark_text(tokenizer, _END)

    def _call(self, tool, tokenizer):
        if self.fenced:
            return f'{lark_text(tokenizer, _CALL_BEGIN, "function", _SEP, tool.name + chr(10) + "```json" + chr(10))} ' \
                   f'{json_rule(tool.parameters)} {lark_text(tokenizer, chr(10) + "```", _CALL_END)}'
        return f"{lark_text(tokenizer, _CALL_BEGIN, tool.name, _SEP)} {json_rule(tool.parameters)} " \
               f"{lark_text(tokenizer, _CALL_END)}"


class Harmony(ToolFormat):
    """gpt-oss: messages on channels; a call is a commentary (or analysis) message addressed to=functions.N."""

    name, trigger = "harmony", ""
    _CALL = re.compile(r"to=functions\.([^\s<]+)[^<]*(?:<\|channel\|>[^<]*)?(?:<\|constrain\|>[^<]*)?"
                       r"<\|message\|>(.*?)(?:<\|call\|>|<\|end\|>|$)", re.S)
    _FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|end\|>|<\|return\|>|$)", re.S)

    def parse(self, text):
        calls = []
        for m in self._CALL.finditer(text):
            args = _object_args(m.group(2).strip())
            if args is None:
                return None
            calls.append(ToolCall(m.group(1), args))
        if not calls:
            return None
        final = self._FINAL.search(text)
        return (final.group(1).strip() if final else ""), calls

    def _repeat(self, tokenizer):
        return ""  # the reply ends at its call's <|call|>: one call per reply

    def _call(self, tool, tokenizer):
        # as the model writes it (OpenAI's harmony guide), or as the template renders a past call
        spoken = lark_text(tokenizer, "<|channel|>", f"commentary to=functions.{tool.name} ", "<|constrain|>",
                           "json", "<|message|>")
        rendered = lark_text(tokenizer, f" to=functions.{tool.name}", "<|channel|>", "commentary json", "<|message|>")
        return f"({spoken} | {rendered}) {json_rule(tool.parameters)} {lark_text(tokenizer, '<|call|>')}"


class Generic(ToolFormat):
    name, trigger, generic = "generic", None, True

    def parse(self, text):
        values = _json_values(text.strip())
        if not values or len(values) != 1 or not isinstance(values[0], dict):
            return None
        reply = values[0]
        if isinstance(reply.get("response"), str) and len(reply) == 1:
            return reply["response"], []
        many = reply.get("tool_calls") if "tool_calls" in reply else [reply.get("tool_call")]
        if not isinstance(many, list) or len(reply) != 1:
            return None
        calls = [_named_call(c, "arguments") for c in many]
        return ("", calls) if calls and None not in calls else None

    def grammar(self, tools, tokenizer, parallel, auto=False):
        return f"start: {json_rule(self.schema(tools, parallel, auto))}"

    @staticmethod
    def schema(tools: Sequence[Tool], parallel: bool, auto: bool) -> dict:
        """The JSON schema of a reply (llama.cpp's generic format)."""
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
        key, value = ("tool_calls", {"type": "array", "items": call, "minItems": 1}) if parallel else ("tool_call", call)
        calls = {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}
        if not auto:
            return calls
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        return {"anyOf": [calls, answer]}


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def detect_format(sources: Sequence[str]) -> ToolFormat:
    """The tool-call format of a model's chat template(s) (its Jinja sources), as llama.cpp detects it."""
    text = "\n".join(s for s in sources if isinstance(s, str))
    if "<|channel|>" in text and "<|call|>" in text:
        return Harmony()
    if _CALL_BEGIN in text:
        return DeepSeek(fenced="```json" in text)
    if "[TOOL_CALLS]" in text:
        return MistralArgs() if "[ARGS]" in text else Mistral()
    if "<tool_call>" in text:
        return Hermes()
    if "<|start_header_id|>" in text and "ipython" in text and "parameters" in text:
        return Llama3Json()
    return Generic()


FORMATS = {f.name: f for f in (Hermes(), Llama3Json(), Mistral(), MistralArgs(), DeepSeek(), Harmony(), Generic())}
