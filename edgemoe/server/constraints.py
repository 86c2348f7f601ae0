"""Constraints on the reply's form a request may ask for: `response_format` (JSON, a JSON schema); tool calls
are tools.py's.

`output_constraint` returns None for free text and the JSON schema the reply must follow for
`{"type": "json_object"}` (any JSON object: {"type": "object"}) or `{"type": "json_schema", "json_schema":
{"schema": ...}}`; `Service.make_job` compiles it for the vocabulary (`json_grammar`, engine/grammar.py) and the
sampler masks every token that would leave the grammar. As OpenAI, json_object needs the word "JSON" (any case)
in the messages, so the model is told what to write; `strict` is accepted either way, the schema is always
enforced.
"""

from __future__ import annotations

from .checks import RequestError, check, show

JSON_OBJECT = {"type": "object"}  # OpenAI's json_object mode: any JSON object


def output_constraint(body: dict, chat: bool) -> dict | None:
    """The JSON schema `body` asks the reply to follow (None: free text); RequestError (400) naming the field."""
    schema = _response_format(body.get("response_format"))
    messages = body.get("messages")  # checked later (schemas._messages): a list of {role, content}
    if schema is JSON_OBJECT and chat and isinstance(messages, list) and not any("json" in _text(m).lower()
                                                                                 for m in messages):
        raise RequestError("'response_format' json_object needs the word \"JSON\" in the messages (as OpenAI's "
                           "API): tell the model to write JSON in a system or user message", "response_format")
    return schema


def _response_format(fmt) -> dict | None:
    if fmt is None:
        return None
    check(isinstance(fmt, dict) and isinstance(fmt.get("type"), str), "response_format",
           'an object such as {"type": "text"}', fmt)
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind != "json_schema":
        raise RequestError(f"'response_format' type {show(kind)} is not one of text, json_object, json_schema",
                           "response_format.type")
    spec = fmt.get("json_schema")
    check(isinstance(spec, dict), "response_format.json_schema", 'an object such as {"name": "reply", "schema": '
           '{...}}', spec)
    name, strict, schema = spec.get("name"), spec.get("strict"), spec.get("schema")
    check(name is None or isinstance(name, str), "response_format.json_schema.name", "a string", name)
    check(strict is None or isinstance(strict, bool), "response_format.json_schema.strict", "true or false", strict)
    check(schema is None or isinstance(schema, dict), "response_format.json_schema.schema", "a JSON schema object",
           schema)
    return schema if schema is not None else {}  # no schema: any JSON value


def _text(message) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts: their text is checked by content.message_text
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def json_grammar(schema: dict, tokenizer, vocab_size: int):
    """The compiled grammar of `schema` for the vocabulary; RequestError naming `response_format` if it cannot be."""
    from ..engine.grammar import Grammar, GrammarError

    if tokenizer is None:
        raise RequestError("'response_format' JSON needs the model's vocabulary, and this model carries none",
                           "response_format")
    try:
        return Grammar.json_schema(schema, tokenizer, vocab_size)
    except GrammarError as e:
        raise RequestError(f"'response_format' schema cannot be compiled: {e}", "response_format") from None


def tool_grammar(fmt, tools, tokenizer, vocab_size: int):
    """The compiled grammar of a reply that must call one of `tools` (a ToolRequest) in `fmt`, or of any reply
    in the generic format; None when the reply is free (the model may answer or call)."""
    from ..engine.grammar import Grammar, GrammarError

    auto = tools.choice == "auto"
    if auto and not fmt.generic:
        return None
    if tokenizer is None:
        raise RequestError("tool calls need the model's vocabulary, and this model carries none", "tools")
    try:
        return Grammar.lark(fmt.grammar(tools.constrained_tools, tokenizer, tools.parallel, auto), tokenizer,
                            vocab_size)
    except GrammarError as e:
        raise RequestError(f"the tools' parameter schemas cannot be compiled: {e}", "tools") from None
