"""Tool calls: the format of each family's real chat template (llama.cpp's models/templates/), read back from what
transformers renders for an assistant's calls, and the grammar that forces a call accepting that same text; then
through the official `openai` client against `edgemoe serve`: the default model (no template: the generic JSON
format) and the same model with Qwen3's template (hermes), whole and streamed, named and required, a tool result
in the next turn, the older `functions` API and the 400s.

The embedded model writes Shakespeare: every call it makes is the grammar's doing, and the raw text of a forced
call is exactly what the template renders for that call (the layout the model family was trained on).
"""

from __future__ import annotations

import json
import signal

import httpx
import openai
import pytest
from test_chat_template import FAMILIES, TOOLS, hf_render, llamacpp_models  # noqa: F401 - fixture

from edgemoe.chat.tool_formats import Generic, Tool, detect_format
from edgemoe.default_model import default_model_path
from edgemoe.engine.grammar import Grammar
from edgemoe.server.tool_reply import ToolSplitter
from edgemoe.tokenizer import load_tokenizer
from tools.serve_process import start

try:
    from jsonschema import validate
except ImportError:  # the test extra lists it
    validate = None

FORMAT_OF = {  # llama.cpp's template → the format (vLLM's parser of the same name reads it)
    "Qwen-Qwen3-0.6B": "hermes", "Qwen-Qwen2.5-7B-Instruct": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3_json", "meta-llama-Llama-3.3-70B-Instruct": "llama3_json",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral", "Mistral-Small-3.2-24B-Instruct-2506": "mistral_args",
    "deepseek-ai-DeepSeek-V3.1": "deepseek", "openai-gpt-oss-120b": "harmony",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes",
}
PARALLEL = ("Qwen-Qwen3-0.6B", "Qwen-Qwen2.5-7B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
            "Mistral-Small-3.2-24B-Instruct-2506", "deepseek-ai-DeepSeek-V3.1")  # templates that render two calls
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]
CALLS = [("call12345", "get_weather", {"city": "Paris"}), ("call23456", "get_weather", {"city": "Rome, \"Italy\""})]
PARAMS = TOOLS[0]["function"]["parameters"]


def _assistant(calls, content="") -> dict:
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]}


def rendered_reply(source: str, family: str, calls, content: str = "") -> str:
    """What the model of `family` writes for `calls`, as transformers renders it: the text after the generation
    prompt, without the end-of-turn token."""
    bos, eos, _, _ = FAMILIES.get(family, ("<s>", "</s>", "", ()))
    prompt = hf_render(source, ASK, bos=bos, eos=eos, tools=TOOLS, add_generation_prompt=True)
    full = hf_render(source, ASK + [_assistant(calls, content)], bos=bos, eos=eos, tools=TOOLS,
                     add_generation_prompt=False)
    assert full.startswith(prompt), family
    reply = full[len(prompt):].rstrip()
    for end in (eos, "<|im_end|>", "<|eot_id|>"):  # gpt-oss ends a call with <|call|>, which the grammar writes
        if reply.endswith(end):
            reply = reply[:-len(end)]
    return reply


def _expected(calls):
    return [(n, a) for _, n, a in calls]


def _got(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed[1]]


@pytest.mark.parametrize("family", sorted(FORMAT_OF))
def test_formats_read_what_the_real_templates_write(llamacpp_models, family):  # noqa: F811
    source = (llamacpp_models / f"{family}.jinja").read_text(encoding="utf-8")
    fmt = detect_format([source])
    assert fmt.name == FORMAT_OF[family]
    cases = [CALLS[:1]] + ([CALLS] if family in PARALLEL else [])
    for calls in cases:
        text = rendered_reply(source, family, calls)
        parsed = fmt.parse(text)
        assert parsed is not None, (family, text)
        assert _got(parsed) == _expected(calls), (family, text)
        if fmt.name.startswith("mistral"):  # the ids the model wrote are kept (Mistral's templates check them)
            assert [c.id for c in parsed[1]] == [i for i, _, _ in calls]
    assert fmt.parse("Thou art a villain, and " + "x" * 40) is None  # plain text is content
    if fmt.name == "hermes":  # text before the call is the content
        parsed = fmt.parse("Let me look.\n" + rendered_reply(source, family, CALLS[:1]).split("<tool_call>", 1)[1]
                           .join(["<tool_call>", ""]))
        assert parsed[0] == "Let me look." and _got(parsed) == _expected(CALLS[:1])


def test_other_templates_use_the_generic_format(llamacpp_models):  # noqa: F811
    for name in ("google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct", "mistralai-Mistral-7B-Instruct-v0.2"):
        path = llamacpp_models / f"{name}.jinja"
        if path.exists():
            assert detect_format([path.read_text(encoding="utf-8")]).generic, name
    assert detect_format([]).generic
    g = Generic()
    assert g.parse('{"response": "Good morrow"}') == ("Good morrow", [])
    assert _got(g.parse('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}')) == \
        _expected(CALLS[:1])
    assert g.parse('{"tool_call": {"name": "get_weather"') is None  # cut short: content


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def qwen2_vocab(llamacpp_models):  # noqa: F811
    """A byte-level vocabulary (llama.cpp's ggml-vocab-qwen2.gguf): any text round-trips, "▁" included."""
    return load_tokenizer(llamacpp_models / "ggml-vocab-qwen2.gguf")


@pytest.mark.parametrize("family", sorted(FORMAT_OF))
def test_forced_call_grammar_accepts_the_template_text(llamacpp_models, qwen2_vocab, family):  # noqa: F811
    """The grammar `tool_choice: required` decodes under accepts the text the template renders for a call, token by
    token, and is then complete (this vocabulary has none of the families' tool tokens: they are text here)."""
    tokenizer = qwen2_vocab
    source = (llamacpp_models / f"{family}.jinja").read_text(encoding="utf-8")
    fmt = detect_format([source])
    tools = [Tool("get_weather", PARAMS), Tool("get_time", {"type": "object", "properties": {}})]
    text = rendered_reply(source, family, CALLS[:1])
    if fmt.name == "hermes":
        text = text[text.index("<tool_call>"):]  # Qwen3 renders an empty think block first; the grammar starts the call
    matcher = Grammar.lark(fmt.grammar(tools, tokenizer, parallel=False), tokenizer, tokenizer.vocab_size).matcher()
    for t in tokenizer.encode(text, add_bos=False, special=False):
        matcher.consume(t)
    assert matcher.accepting, (family, text)
    other = text.replace("get_weather", "get_wether")
    bad = Grammar.lark(fmt.grammar(tools, tokenizer, parallel=False), tokenizer, tokenizer.vocab_size).matcher()
    with pytest.raises(Exception, match="does not follow the grammar"):
        for t in tokenizer.encode(other, add_bos=False, special=False):
            bad.consume(t)


def test_splitter_releases_content_and_holds_the_call(tokenizer):
    fmt = detect_format(["{{ '<tool_call>' }}"])
    text = 'Good morrow.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = tokenizer.encode(text, add_bos=False)
    s = ToolSplitter(fmt, tokenizer, frozenset())
    released = []
    for i in ids:
        released += s.push({"id": i, "text": tokenizer.decode([i])})
    rest, content, calls = s.finish()
    assert tokenizer.decode([e["id"] for e in released]) == "Good morrow." and rest == []
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    s = ToolSplitter(fmt, tokenizer, frozenset())  # "<tool" that is not a call: held, then released as content
    out = [e for i in tokenizer.encode("a <toolbox> b", add_bos=False) for e in s.push({"id": i, "text": ""})]
    rest, content, calls = s.finish()
    assert tokenizer.decode([e["id"] for e in out + rest]) == "a <toolbox> b" and calls == [] and content is None


# ---------------------------------------------------------------------- through `edgemoe serve`

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
           "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
SERVED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": WEATHER}},
                {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def _serve(tmp_path_factory, extra):
    path = str(tmp_path_factory.mktemp("tools") / "edgemoe.sock")
    proc = start(["--socket", path, "--ctx", "2048", *extra], path, path + ".log")
    http = httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=120)
    return proc, openai.OpenAI(base_url="http://edgemoe/v1", api_key="x", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    proc, client = _serve(tmp_path_factory, [])
    yield client
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, llamacpp_models):  # noqa: F811
    proc, client = _serve(tmp_path_factory, ["--chat-template", str(llamacpp_models / "Qwen-Qwen3-0.6B.jinja")])
    yield client
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def _check_call(call, name):
    assert call.type == "function" and call.function.name == name and call.id
    args = json.loads(call.function.arguments)
    schema = WEATHER if name == "get_weather" else TIME
    if validate is not None:
        validate(args, schema)
    assert set(args) == set(schema["required"])
    return args


def _stream_calls(client, **kw):
    chunks = list(client.chat.completions.create(model="m", stream=True, **kw))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    return calls, finish


@pytest.mark.parametrize("server", ["generic", "qwen3"])
def test_forced_calls_through_the_openai_client(request, server):
    client = request.getfixturevalue(server)
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        r = client.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        assert c.message.content is None
        args = _check_call(c.message.tool_calls[0], name or c.message.tool_calls[0].function.name)
        calls, finish = _stream_calls(client, messages=MESSAGES, tools=SERVED_TOOLS, tool_choice=choice,
                                      temperature=0, max_tokens=200)
        assert finish == ["tool_calls"] and len(calls) == 1 and calls[0].index == 0
        assert json.loads(calls[0].function.arguments) == args  # streamed as whole: the same call
    sampled = [client.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, tool_choice="required",
                                              temperature=1.0, seed=s, max_tokens=200).choices[0] for s in range(3)]
    for c in sampled:
        assert c.finish_reason == "tool_calls"
        _check_call(c.message.tool_calls[0], c.message.tool_calls[0].function.name)


def test_forced_call_is_laid_out_as_the_template_renders_it(qwen3, llamacpp_models, tokenizer):  # noqa: F811
    """The raw tokens of a forced hermes call decode to exactly what Qwen3's template renders for that call."""
    r = qwen3.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, tool_choice="required",
                                      temperature=0, max_tokens=200)
    c = r.choices[0]
    raw = tokenizer.decode(c.token_ids, special=True)
    call = c.message.tool_calls[0]
    source = (llamacpp_models / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    expected = rendered_reply(source, "Qwen-Qwen3-0.6B", [("x", call.function.name, json.loads(call.function.arguments))])
    assert raw == expected[expected.index("<tool_call>"):]


def test_next_turn_carries_the_call_and_its_result(generic, qwen3):
    for client in (generic, qwen3):
        reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS,
                                               tool_choice="required", temperature=0, max_tokens=200)
        first = reply.choices[0]
        call = first.message.tool_calls[0]
        turn = MESSAGES + [first.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
        r = client.chat.completions.create(model="m", messages=turn, tools=SERVED_TOOLS, temperature=0, max_tokens=40)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert r.usage.prompt_tokens > reply.usage.prompt_tokens + reply.usage.completion_tokens // 2


def test_auto_and_none(generic, qwen3):
    r = qwen3.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, temperature=0, max_tokens=24)
    c = r.choices[0]  # Shakespeare does not call tools of its own accord: text, as without tools
    assert c.message.tool_calls is None and c.message.content and c.finish_reason == "length"
    plain = qwen3.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=24).choices[0]
    assert plain.message.tool_calls is None and plain.message.content
    r = generic.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, temperature=0, max_tokens=200)
    c = r.choices[0]  # generic auto: a call or an answer, both JSON under the grammar
    assert (c.finish_reason == "tool_calls" and c.message.tool_calls) or \
        (c.finish_reason == "stop" and c.message.content is not None and not c.message.tool_calls), c


def test_parallel_calls_and_the_functions_api(generic):
    r = generic.chat.completions.create(model="m", messages=MESSAGES, tools=SERVED_TOOLS, tool_choice="required",
                                        parallel_tool_calls=True, temperature=0, max_tokens=400)
    c = r.choices[0]
    if c.finish_reason == "tool_calls":  # one or more calls; a model that never stops listing them hits length
        for call in c.message.tool_calls:
            _check_call(call, call.function.name)
    else:
        assert c.finish_reason == "length"
    legacy = generic.chat.completions.create(
        model="m", messages=MESSAGES, functions=[t["function"] for t in SERVED_TOOLS],
        function_call={"name": "get_weather"}, temperature=0, max_tokens=200).choices[0]
    assert legacy.finish_reason == "function_call" and legacy.message.function_call.name == "get_weather"
    json.loads(legacy.message.function_call.arguments)


@pytest.mark.parametrize("body,param", [
    ({"tools": SERVED_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": SERVED_TOOLS + SERVED_TOOLS[:1]}, "tools[2]"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": SERVED_TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": SERVED_TOOLS, "functions": [SERVED_TOOLS[0]["function"]]}, "functions"),
    ({"tools": SERVED_TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_fields_name_the_field(generic, body, param):
    body = dict(body)
    with pytest.raises(openai.BadRequestError) as e:
        extra = {k: body.pop(k) for k in list(body) if k == "chat_template_kwargs"}  # not the client's own field
        generic.chat.completions.create(model="m", **{"messages": MESSAGES, "max_tokens": 4, **body}, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_chat_template_kwargs_reach_the_template(qwen3):
    """Qwen3's enable_thinking=false writes an empty think block into the prompt: more prompt tokens."""
    on = qwen3.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1, temperature=0)
    off = qwen3.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1, temperature=0,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
