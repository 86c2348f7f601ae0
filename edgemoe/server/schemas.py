"""Request validation for the OpenAI-style endpoints: every error names the offending field (HTTP 400).

Every field of OpenAI's completions and chat-completions references is accepted. What edgemoe cannot honour
(`suffix`, image or audio input, `best_of` > `n`) is a 400 naming the field; tools and tool calls are
tools.py's; fields that do not change the tokens (`user`, `metadata`, `store`, `service_tier`, `prediction`,
...) and other servers' vendor fields are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sampling import MAX_LOGIT_BIAS, MAX_PENALTY
from .checks import RequestError, check, cut, is_int, is_num, show
from .constraints import output_constraint
from .content import message_text
from .tools import ToolRequest, history_message, parse_tools

__all__ = ["CompletionRequest", "RequestError", "chat_prompt", "parse_request"]

MAX_LOGPROBS = 20
MAX_STOPS = 8
MAX_N = 16  # choices per prompt; each is a sequence of its own in the batch
MAX_CHOICES = 64  # choices per request: prompts × n
# The sampler divides float32 logits by the temperature (and by the repeat penalty): below 1e-4 the quotient
# overflows float32 for large logits (1e-300 rounds to 0.0: a division by zero). Any temperature that small
# already samples the argmax; 0 says so exactly. Above 1e4 every token is equally likely, whatever the model says.
MIN_SCALE, MAX_SCALE = 1e-4, 1e4
MAX_SEED = 2**64 - 1  # numpy's PCG64 seeds from 64 bits


@dataclass
class CompletionRequest:
    """A validated request; sampling fields left None take the server's `sampling` defaults."""

    chat: bool
    prompt: str | list[int] | None = None  # completions: the prompt one job continues, text or token ids
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: every prompt, in choice order
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content"}], content a string
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids distinct
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage and no choices
    logprobs: int = 0  # alternatives the engine reports per token; 0 = no logprobs
    top_logprobs: int = 0  # of which the reply shows (completions add the chosen token, as OpenAI does)
    echo: bool = False  # completions: the prompt's text before the completion's
    n: int = 1  # choices per prompt
    choice: int = 0  # the choice index a job answers: its seed is seed + choice
    priority: str | None = None
    model: str | None = None
    json_schema: dict | None = None  # response_format: the JSON schema the reply follows; None = free text
    tools: ToolRequest | None = None  # chat: the functions the model may call
    template_kwargs: dict = field(default_factory=dict)  # chat: `chat_template_kwargs`, extra template variables


# field → (test, description)
_NUMERIC = {
    "max_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: is_num(v) and (v == 0 or MIN_SCALE <= v <= MAX_SCALE),
                    f"0 (greedy) or a number from {MIN_SCALE:g} to {MAX_SCALE:g}"),
    "top_p": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "min_p": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "repeat_penalty": (lambda v: is_num(v) and MIN_SCALE <= v <= MAX_SCALE,
                       f"a number from {MIN_SCALE:g} to {MAX_SCALE:g} (1 = off)"),
    "repeat_last_n": (lambda v: is_int(v) and v >= -1, "an integer >= -1"),
    "seed": (lambda v: is_int(v) and -(2**63) <= v <= MAX_SEED,
             f"an integer from {-(2**63)} to {MAX_SEED} (-1: a fresh seed, as llama.cpp)"),
    "presence_penalty": (lambda v: is_num(v) and -MAX_PENALTY <= v <= MAX_PENALTY,
                         f"a number from {-MAX_PENALTY:g} to {MAX_PENALTY:g} (0 = off)"),
    "frequency_penalty": (lambda v: is_num(v) and -MAX_PENALTY <= v <= MAX_PENALTY,
                          f"a number from {-MAX_PENALTY:g} to {MAX_PENALTY:g} (0 = off)"),
    "n": (lambda v: is_int(v) and 1 <= v <= MAX_N, f"an integer from 1 to {MAX_N}"),
}


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """Validate a decoded JSON body of /v1/completions (chat=False) or /v1/chat/completions (chat=True)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    req = CompletionRequest(chat=chat)
    for name, (ok, what) in _NUMERIC.items():
        v = body.get(name)
        if v is not None:
            check(ok(v), name, what, v)
            setattr(req, name, v)
    if req.seed is not None and req.seed < 0:  # OpenAI's seed is an int64; llama.cpp's -1 asks for a fresh one
        req.seed = None if req.seed == -1 else req.seed % (MAX_SEED + 1)
    _max_completion_tokens(body, req)
    for name in ("model", "priority"):
        v = body.get(name)
        check(v is None or isinstance(v, str), name, "a string", v)
    req.model, req.priority = body.get("model"), body.get("priority")
    stream = body.get("stream", False)
    check(isinstance(stream, (bool, type(None))), "stream", "true or false", stream)
    req.stream = bool(stream)
    req.include_usage = _stream_options(body.get("stream_options"))
    req.stop = _stops(body.get("stop"))
    req.logit_bias = _logit_bias(body.get("logit_bias"))
    req.json_schema = output_constraint(body, chat)  # JSON (a schema) or free text
    _refuse_unsupported(body, chat, req.n)
    if chat:
        req.messages = _messages(body.get("messages"))
        req.tools = parse_tools(body)
        req.template_kwargs = _template_kwargs(body.get("chat_template_kwargs"))
        if req.tools is not None and req.tools.active and req.json_schema is not None:
            raise RequestError("'response_format' JSON and tool calls cannot constrain one reply together; send "
                               "'tool_choice': \"none\" or leave 'response_format' out", "response_format")
        lp, top = body.get("logprobs", False), body.get("top_logprobs")
        check(lp is None or isinstance(lp, bool), "logprobs", "true or false", lp)
        check(top is None or (is_int(top) and 0 <= top <= MAX_LOGPROBS), "top_logprobs",
               f"an integer from 0 to {MAX_LOGPROBS}", top)
        if top and not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        req.top_logprobs = top or 0
        req.logprobs = max(req.top_logprobs, 1) if lp else 0  # the engine reports one alternative at least
    else:
        req.prompts = _prompts(body.get("prompt"))
        req.prompt = req.prompts[0]
        if len(req.prompts) * req.n > MAX_CHOICES:
            raise RequestError(f"{len(req.prompts)} prompts × n={req.n} ask for {len(req.prompts) * req.n} "
                               f"choices; at most {MAX_CHOICES} per request", "n" if req.n > 1 else "prompt")
        lp = body.get("logprobs")
        check(lp is None or (is_int(lp) and 0 <= lp <= MAX_LOGPROBS), "logprobs",
               f"an integer from 0 to {MAX_LOGPROBS} (alternatives per token)", lp)
        req.top_logprobs = lp or 0
        req.logprobs = 0 if lp is None else max(lp, 1)  # 0 still returns the chosen tokens' logprobs
        echo = body.get("echo")
        check(echo is None or isinstance(echo, bool), "echo", "true or false", echo)
        req.echo = bool(echo)
        if req.echo and req.logprobs:
            raise RequestError("'echo' with 'logprobs' asks for the prompt tokens' logprobs, which edgemoe does "
                               "not compute; leave one of them out", "echo")
    return req


def _max_completion_tokens(body: dict, req: CompletionRequest) -> None:
    """`max_completion_tokens` (OpenAI's newer name) is `max_tokens`; both given must agree."""
    v = body.get("max_completion_tokens")
    if v is None:
        return
    ok, what = _NUMERIC["max_tokens"]
    check(ok(v), "max_completion_tokens", what, v)
    if req.max_tokens is not None and req.max_tokens != v:
        raise RequestError(f"'max_completion_tokens' {v} and 'max_tokens' {req.max_tokens} disagree; send one "
                           "of them", "max_completion_tokens")
    req.max_tokens = v


def _stream_options(v: Any) -> bool:
    """stream_options.include_usage (ignored without streaming: a whole reply always carries its usage)."""
    if v is None:
        return False
    check(isinstance(v, dict), "stream_options", "an object such as {\"include_usage\": true}", v)
    usage = v.get("include_usage")
    check(usage is None or isinstance(usage, bool), "stream_options.include_usage", "true or false", usage)
    return bool(usage)


def _logit_bias(v: Any) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} → ((id, bias), ...); ids are checked against the vocabulary when the job is made."""
    if v is None:
        return ()
    check(isinstance(v, dict), "logit_bias", 'an object mapping token ids to biases, like {"50256": -100}', v)
    out: dict[int, float] = {}
    for key, bias in v.items():
        name = f"logit_bias.{cut(key)}"
        check(key.isascii() and key.isdigit() and len(key) <= 12, name, "keyed by a token id (a decimal "
               "integer string)", key)
        check(is_num(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, name,
               f"a number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}", bias)
        if int(key) in out:
            raise RequestError(f"'logit_bias' names token {int(key)} twice", name)
        out[int(key)] = float(bias)
    return tuple(out.items())


def _refuse_unsupported(body: dict, chat: bool, n: int) -> None:
    """400 for the fields whose meaning edgemoe cannot honour (when set to anything but their no-op value)."""
    if chat:
        if body.get("audio") is not None:
            raise RequestError("audio output is not supported: this model writes text only; leave 'audio' out",
                               "audio")
        modalities = body.get("modalities")
        check(modalities is None or (isinstance(modalities, list) and all(isinstance(m, str) for m in modalities)),
               "modalities", 'a list such as ["text"]', modalities)
        if modalities and set(modalities) != {"text"}:
            raise RequestError(f"'modalities' {show(modalities)} is not supported: this model writes text only; "
                               'send ["text"] or leave it out', "modalities")
        if body.get("web_search_options") is not None:
            raise RequestError("web search is not supported; leave 'web_search_options' out", "web_search_options")
        return
    suffix = body.get("suffix")
    check(suffix is None or isinstance(suffix, str), "suffix", "a string", suffix)
    if suffix:
        raise RequestError("'suffix' (insertion, text after the completion) is not supported; leave it out",
                           "suffix")
    best_of = body.get("best_of")
    check(best_of is None or (is_int(best_of) and best_of >= 1), "best_of", "an integer >= 1", best_of)
    if best_of is not None and best_of != n:
        raise RequestError(f"'best_of' {best_of} != 'n' {n}: ranking candidates by logprob is not supported; "
                           "leave 'best_of' out", "best_of")


def _stops(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    check(isinstance(v, list) and all(isinstance(s, str) and s for s in v) and len(v) <= MAX_STOPS, "stop",
           f"a non-empty string or a list of up to {MAX_STOPS} non-empty strings", v)
    return list(v)


def _prompts(v: Any) -> list[str | list[int]]:
    """A prompt (text or token ids) or a list of them (a list of strings, or a list of lists of token ids)."""
    if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        return [_prompt(p, f"prompt[{i}]") for i, p in enumerate(v)]
    return [_prompt(v, "prompt")]


def _prompt(v: Any, name: str) -> str | list[int]:
    if isinstance(v, str):
        check(v != "", name, "a non-empty string", v)
        return v
    check(isinstance(v, list) and len(v) > 0 and all(is_int(t) and t >= 0 for t in v), name,
           "a non-empty string or a non-empty list of token ids (or a list of those)",
           v if not isinstance(v, list) else "a list")
    return list(v)


def _messages(v: Any) -> list[dict]:
    check(isinstance(v, list) and len(v) > 0, "messages", "a non-empty list of {role, content} objects", v)
    out = []
    for i, m in enumerate(v):
        name = f"messages[{i}]"
        check(isinstance(m, dict), name, "an object with 'role' and 'content'", m)
        role = m.get("role")
        check(isinstance(role, str) and role != "", f"{name}.role", "a non-empty string", role)
        out.append({"role": role, "content": message_text(m.get("content"), f"{name}.content", role),
                    **history_message(m, name)})
    return out


_TEMPLATE_OWN = ("messages", "tools", "documents", "add_generation_prompt")  # variables the server sets


def _template_kwargs(v: Any) -> dict:
    """`chat_template_kwargs` (vLLM's and llama.cpp's field, e.g. {"enable_thinking": false}): extra variables."""
    if v is None:
        return {}
    check(isinstance(v, dict), "chat_template_kwargs", 'an object such as {"enable_thinking": false}', v)
    for key in v:
        check(key.isidentifier() and key not in _TEMPLATE_OWN, f"chat_template_kwargs.{cut(key)}",
              f"a template variable name other than {', '.join(_TEMPLATE_OWN)}", key)
    return dict(v)


def chat_prompt(messages: list[dict]) -> str:
    """The plain chat format for models without a template: "role: content" lines, then "assistant:" (the server
    renders it through edgemoe.chat: Session.chat_template, whose origin is then "plain")."""
    from ..chat import ChatTemplate

    return ChatTemplate.plain().render(messages)
