"""A chat template: messages → the prompt text the model was trained on, rendered as transformers renders it.

transformers' `apply_chat_template` (utils/chat_template_utils.py) is the reference: Jinja2's
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loop-controls extension and a
no-op `{% generation %}` block, `raise_exception`, `strftime_now`, its own `tojson` (no HTML escaping,
indent/separators/sort_keys), a `dict` that only builds dicts and a `namespace` that refuses "_" names; the
messages with their None-valued keys dropped and reasoning copied under `thinking` and `reasoning_content`;
the variables `messages`, `tools`, `documents`, `add_generation_prompt`, `bos_token`, `eos_token` and any
extra keyword (which wins over the special tokens). tests/test_chat_template.py compares the text with
transformers' on llama.cpp's collection of real templates.

Templates are untrusted code (they come inside model files): the sandbox refuses attribute access to Python
internals, and every Jinja2 error, `raise_exception` included, becomes a UsageError (HTTP 400 in the server).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import UsageError

# The plain format for models without a template (the embedded default model has none): "role: content"
# lines, then "assistant:" to prompt the reply. Text parts of a list content are joined.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ORIGINS = ("model", "file", "plain")  # the model's own template, --chat-template FILE, the plain fallback
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' names, the first is standard
MAX_ERROR = 300  # characters of a template's own error message quoted in ours (one line)


class ChatTemplate:
    """Renders messages with one model's chat template(s) and tokenizes the result.

    templates: name → Jinja source ("default", and e.g. "tool_use", chosen when tools are given, as
    transformers does). origin: "model" | "file" | "plain". label: the template as the error messages name it.
    stop_ids: ids that end a chat reply (edgemoe.chat.end_of_turn); set by `load_chat_template`.
    broken: a compile error to report on every render instead of the template (a model's own template that
    does not compile fails its chat requests, not the other commands).
    """

    def __init__(self, templates: Mapping[str, str], *, origin: str, label: str, bos_token: str = "",
                 eos_token: str = "", tokenizer=None, stop_ids: frozenset[int] = frozenset(),
                 broken: str | None = None):
        assert origin in ORIGINS, origin
        self.sources = dict(templates)
        self.origin = origin
        self.label = label
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.broken = broken
        self._compiled: dict[str, Any] = {}
        if broken is None:
            for name, source in self.sources.items():
                self._compiled[name] = compile_template(source, label if name == "default" else f"{label} [{name}]")

    @classmethod
    def plain(cls, tokenizer=None) -> ChatTemplate:
        return cls({"default": PLAIN_TEMPLATE}, origin="plain", label="the plain chat format", tokenizer=tokenizer)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin}: {self.label}, templates={sorted(self.sources)})"

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, **kwargs) -> str:
        """The prompt text for `messages` ([{"role", "content", ...}]); `tools`: JSON schemas the template may
        list; `kwargs`: extra template variables (e.g. enable_thinking=False). UsageError if the template
        refuses the conversation (its `raise_exception`) or fails."""
        if self.broken is not None:
            raise UsageError(self.broken)
        template = self._choose(tools)
        if not messages:
            raise UsageError("a chat needs at least one message")
        chat = [_message(m, i) for i, m in enumerate(messages)]
        if tools is not None:
            if not all(isinstance(t, Mapping) for t in tools):
                raise UsageError("'tools' must be a list of JSON schema objects")
            tools = _plain(list(tools))
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **_plain(kwargs)}
        try:
            return template.render(messages=chat, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # noqa: BLE001 - template code is untrusted: anything it raises is its error
            raise UsageError(f"{self.label} cannot render these messages: {_describe(e)}") from None

    def encode(self, messages: Sequence[Mapping], **kwargs) -> list[int]:
        """The prompt's token ids: rendered (same arguments as `render`), control tokens written by the template
        parsed as such, and one BOS. As llama.cpp's server: when the vocabulary adds BOS itself, a BOS the
        template wrote first is dropped from the text (transformers instead tokenizes without adding one)."""
        tok = self.tokenizer
        if tok is None:
            raise UsageError("this model carries no vocabulary, so chat messages cannot be tokenized; send token "
                             "ids to /v1/completions instead")
        text = self.render(messages, **kwargs)
        if tok.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return tok.encode(text, special=True)

    @property
    def tool_format(self):
        """How this template's model writes tool calls (edgemoe.chat.tool_formats.ToolFormat)."""
        from .tool_formats import detect_format

        return detect_format(list(self.sources.values()))

    def _choose(self, tools):
        if tools is not None and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        raise UsageError(f"{self.label} has several named templates ({', '.join(sorted(self._compiled))}) and no "
                         "'default'; pass --chat-template FILE")


def compile_template(source: str, label: str):
    """A compiled Jinja template in the sandbox; UsageError naming the line if it does not compile."""
    import jinja2

    if not isinstance(source, str):
        raise UsageError(f"{label} is not text (a {type(source).__name__}); pass --chat-template FILE")
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"{label} does not compile (line {e.lineno}: {_cut(e.message or str(e))}); fix it, or "
                         "pass --chat-template FILE") from None
    except Exception as e:  # noqa: BLE001 - Jinja's parser on untrusted text: any failure is the template's
        raise UsageError(f"{label} does not compile ({_describe(e)}); fix it, or pass --chat-template FILE") from None


@lru_cache(maxsize=1)
def _environment():
    """transformers' sandboxed environment, built once (on first use: importing this module builds nothing)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks: here it
        renders its body unchanged (transformers' AssistantTracker when not tracking)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class()
    return env


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '); transformers' writes plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template: builds dicts, exposes nothing else of the type (no attribute escapes)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _namespace_class():
    import jinja2
    import jinja2.utils

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes on "
                                                  f"a namespace, got {name!r}")

    class TemplateNamespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing "_" names (no reach into CPython internals)."""

        def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=...)` still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _message(m: Any, i: int) -> dict:
    """One message as the template sees it: a fresh copy, None-valued keys dropped (OpenAI clients send
    `"content": null` next to tool calls; templates test for a missing key), reasoning under both names."""
    if not isinstance(m, Mapping):
        raise UsageError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
    out = {k: _plain(v) for k, v in m.items() if v is not None}
    reasoning = next((out[k] for k in REASONING_FIELDS if out.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _plain(value: Any) -> Any:
    """JSON-like data rebuilt from plain types (what the sandbox may see), as transformers does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{type(value).__name__}>"


def _describe(e: Exception) -> str:
    import jinja2

    if isinstance(e, jinja2.exceptions.TemplateError) and type(e) is jinja2.exceptions.TemplateError:
        return _cut(str(e))  # raise_exception(message): the template's own words
    return _cut(f"{type(e).__name__}: {e}")


def _cut(s: str) -> str:
    s = " ".join(str(s).split())  # one line
    return s if len(s) <= MAX_ERROR else s[:MAX_ERROR - 3] + "..."
