"""Chat templates: edgemoe.chat renders exactly what transformers' apply_chat_template renders, on the real templates
llama.cpp keeps in models/templates/ (fetched once from the llama-cpp-python sdist into
~/.cache/edgemoe-test-templates); a served GGUF's own template is applied and its end-of-turn token ends chat
replies only; --chat-template overrides it; a broken template is one line (exit 2, or HTTP 400).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import tarfile
import warnings
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from llamacpp_sdist import SDIST, extract

from edgemoe.chat import ChatTemplate, end_of_turn_ids, load_chat_template
from edgemoe.errors import UsageError
from tools.serve_process import start

VOCABS = ("llama-bpe", "qwen2")  # Llama 3 and Qwen 2 vocabularies, for the token-level checks
CACHE = pathlib.Path.home() / ".cache" / "edgemoe-test-templates"


def _complete(d: pathlib.Path) -> bool:
    return (d / "COMPLETE").exists()


def _fetch(cache: pathlib.Path) -> pathlib.Path:
    """llama.cpp's models/templates/*.jinja and two vocabularies from the sdist, extracted into `cache`."""
    wanted = tuple(f"/ggml-vocab-{v}.gguf" for v in VOCABS)
    extract(cache, lambda name: "/templates/" in name and name.endswith(".jinja") or name.endswith(wanted), _complete)
    (cache / "COMPLETE").write_text(SDIST)
    return cache


@pytest.fixture(scope="session")
def llamacpp_models() -> pathlib.Path:
    """A directory with llama.cpp's templates (*.jinja) and the ggml-vocab-{llama-bpe,qwen2}.gguf files."""
    try:
        return _fetch(CACHE)
    except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as e:
        pytest.skip(f"llama.cpp's templates are not cached in {CACHE} and could not be fetched from PyPI "
                    f"({SDIST}): {e}")


def hf_render(source: str, messages, *, bos: str, eos: str, tools=None, add_generation_prompt=True, **kwargs) -> str:
    """transformers' apply_chat_template(tokenize=False) on a tiny fast tokenizer carrying `source`."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, bos or "<bos>": 1, eos: 2}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, chat_template=source,
                                  **({"bos_token": bos} if bos else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       tokenize=False, **kwargs)


def ours(source: str, *, bos: str, eos: str) -> ChatTemplate:
    return ChatTemplate({"default": source}, origin="file", label="the test template", bos_token=bos, eos_token=eos)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                   "required": ["city"]}}}]
CALL_ID = "call12345"  # Mistral's templates want 9 alphanumeric characters
CONVERSATIONS = {
    "system": dict(messages=[{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "Hi <there> & 'you' — é 日本"}]),
    "multi_turn": dict(messages=[{"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": "Hi! How can I help?"},
                                 {"role": "user", "content": "Tell me a joke."}]),
    "tools": dict(tools=TOOLS, messages=[
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": '{"temp_c": 21}'}]),
    "reasoning": dict(messages=[{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
                                {"role": "user", "content": "3+3?"}]),
}
# llama.cpp's file → (bos, eos, text the generation prompt ends with, conversations it supports)
FAMILIES = {
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>", "<|im_start|>assistant\n", ("system", "multi_turn", "tools", "reasoning")),
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>", "<|im_start|>assistant\n", ("system", "multi_turn", "tools")),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>",
                                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                         ("system", "multi_turn", "tools")),
    "meta-llama-Llama-3.3-70B-Instruct": ("<|begin_of_text|>", "<|eot_id|>",
                                          "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                          ("system", "multi_turn", "tools")),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>", "[/INST]", ("system", "multi_turn", "tools")),
    "Mistral-Small-3.2-24B-Instruct-2506": ("<s>", "</s>", "[/INST]", ("system", "multi_turn", "tools")),
    "deepseek-ai-DeepSeek-V3.1": ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                                  "<\uff5cAssistant\uff5c>", ("system", "multi_turn", "tools", "reasoning")),
    "openai-gpt-oss-120b": ("<|startoftext|>", "<|return|>", "<|start|>assistant",
                            ("system", "multi_turn", "tools", "reasoning")),
}
CASES = [(f, c) for f, spec in FAMILIES.items() for c in spec[3]]


@pytest.mark.parametrize("family,conversation", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_family_templates_match_transformers(llamacpp_models, family, conversation):
    source = (llamacpp_models / f"{family}.jinja").read_text(encoding="utf-8")
    bos, eos, prompt_end, _ = FAMILIES[family]
    conv = CONVERSATIONS[conversation]
    expected = hf_render(source, conv["messages"], bos=bos, eos=eos, tools=conv.get("tools"))
    got = ours(source, bos=bos, eos=eos).render(conv["messages"], tools=conv.get("tools"), add_generation_prompt=True)
    assert got == expected
    if conversation != "tools":  # (after a tool result, some templates wait for more results)
        assert prompt_end in got[-len(prompt_end) - 30:]
    last_user = [m["content"] for m in conv["messages"] if m["role"] == "user"][-1]
    assert last_user in got  # not trivially equal: the conversation reached the prompt
    if conversation == "tools":
        assert "get_weather" in got


def _templates(d: pathlib.Path) -> list[str]:
    return sorted(p.stem for p in d.glob("*.jinja"))


def test_every_llamacpp_template_matches_transformers(llamacpp_models):
    """All of llama.cpp's templates: a system + user and a multi-turn conversation with and without the generation
    prompt, and a tool call with its result and a tools list: the same text, or both refuse (our refusal is a
    UsageError naming the template's reason)."""
    names = _templates(llamacpp_models)
    assert len(names) >= 40, names
    rendered, refused = 0, []
    for name in names:
        source = (llamacpp_models / f"{name}.jinja").read_text(encoding="utf-8")
        template = ours(source, bos="<s>", eos="</s>")
        for conv, agp in (("system", True), ("system", False), ("multi_turn", True), ("multi_turn", False),
                          ("tools", True)):
            msgs, tools = CONVERSATIONS[conv]["messages"], CONVERSATIONS[conv].get("tools")
            try:
                expected = hf_render(source, msgs, bos="<s>", eos="</s>", tools=tools, add_generation_prompt=agp)
            except Exception as e:  # noqa: BLE001 - transformers refuses: so must we
                with pytest.raises(UsageError):
                    template.render(msgs, tools=tools, add_generation_prompt=agp)
                refused.append(f"{name}/{conv}: {type(e).__name__}")
                continue
            assert template.render(msgs, tools=tools, add_generation_prompt=agp) == expected, (name, conv, agp)
            rendered += 1
    print(f"{rendered} renders identical; both refused: {refused}")
    assert rendered >= 4 * len(names)  # most templates render these conversations


def test_extra_variables_and_strftime(llamacpp_models):
    """Extra keywords reach the template (Qwen3's enable_thinking) and win over the special tokens; the date
    helper and tojson's indent work as transformers'."""
    source = (llamacpp_models / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    msgs = CONVERSATIONS["system"]["messages"]
    got = ours(source, bos="", eos="<|im_end|>").render(msgs, enable_thinking=False)
    assert got == hf_render(source, msgs, bos="", eos="<|im_end|>", enable_thinking=False)
    assert got.endswith("<think>\n\n</think>\n\n")
    t = ours("{{ bos_token }}|{{ strftime_now('%Y') }}|{{ tools | tojson(indent=2) }}|{{ '<&>' | tojson }}",
             bos="<s>", eos="</s>")
    one = [{"role": "user", "content": "x"}]
    text = t.render(one, tools=[{"a": "é"}], bos_token="<B>")
    assert text == hf_render(t.sources["default"], one, bos="<s>", eos="</s>", tools=[{"a": "é"}], bos_token="<B>")
    assert text.startswith("<B>|") and '"é"' in text and '"<&>"' in text


def test_template_errors_are_usage_errors():
    with pytest.raises(UsageError, match=r"does not compile \(line 2: .*\); fix it, or pass --chat-template FILE"):
        ours("ok\n{% for m in messages %}{{ m }", bos="", eos="")
    refuse = ours("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with "
                  "the user') }}{% endif %}ok", bos="", eos="")
    with pytest.raises(UsageError, match="the test template cannot render these messages: Conversations must start "
                                         "with the user$"):
        refuse.render([{"role": "assistant", "content": "x"}])
    assert refuse.render([{"role": "user", "content": "x"}]) == "ok"
    for escape in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}", "{{ dict(a=1).update(b=2) }}",
                   "{{ messages.append(1) }}"):  # the sandbox: no Python internals, no mutation
        with pytest.raises(UsageError, match="cannot render these messages: SecurityError: "):
            ours(escape, bos="", eos="").render([{"role": "user", "content": "x"}])
    for hidden in ("{{ ''.format.__globals__ }}", "{{ dict.__class__ }}"):  # unsafe attributes read as undefined
        assert ours(hidden, bos="", eos="").render([{"role": "user", "content": "x"}]) == ""
    with pytest.raises(UsageError, match="cannot render"):
        ours("{{ messages[0]['content'] + 1 }}", bos="", eos="").render([{"role": "user", "content": "x"}])
    assert "\n" not in str(pytest.raises(UsageError, refuse.render, [{"role": "assistant", "content": "x"}]).value)
    broken = ChatTemplate({"default": "{{"}, origin="model", label="m", broken="m does not compile")
    with pytest.raises(UsageError, match="^m does not compile$"):
        broken.render([{"role": "user", "content": "x"}])


def test_plain_fallback_is_the_old_format():
    from edgemoe.default_model import default_model_path
    from edgemoe.server.schemas import chat_prompt
    from edgemoe.tokenizer import load_tokenizer

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ChatTemplate.plain().render(msgs) == "system: be brief\nuser: hi\nassistant:" == chat_prompt(msgs)
    assert ChatTemplate.plain().render(msgs, add_generation_prompt=False) == "system: be brief\nuser: hi\n"
    path = default_model_path()  # the embedded model has no template
    tok = load_tokenizer(path)
    t = load_chat_template(path, tok)
    assert t.origin == "plain" and t.encode(msgs) == tok.encode(chat_prompt(msgs))
    assert t.stop_ids == tok.eos_ids


# ------------------------------------------------------------------------- vocabularies and where templates live

def write_vocab(path, controls: list[str], chat_template=None) -> None:
    """The embedded model's vocabulary plus `controls` as control tokens, and `chat_template` (a string, or
    [{"name", "template"}]) as GGUF metadata."""
    from gguf import GGUFWriter, TokenType

    from edgemoe.default_model import vocabulary

    pieces, scores, types = vocabulary()
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces + controls)
    w.add_token_scores(scores + [0.0] * len(controls))
    w.add_token_types(types + [int(TokenType.CONTROL)] * len(controls))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# OpenChat's format: "<|end_of_turn|>" closes a turn, a token llama.cpp's end-of-generation list does not have.
OPENCHAT = ("{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['user', 'assistant', 'system'] %}"
            "{{ raise_exception('This template has no ' + message['role'] + ' role') }}{% endif %}"
            "{{ 'GPT4 Correct ' + message['role'] | title + ': ' + message['content'] + '<|end_of_turn|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}")


def test_gguf_templates_named_and_default(tmp_path):
    from edgemoe.tokenizer import load_tokenizer

    path = tmp_path / "v.gguf"
    write_vocab(path, ["<|im_start|>", "<|im_end|>"], [{"name": "default", "template": CHATML},
                                                       {"name": "tool_use", "template": "tools:{{ tools | length }}"}])
    tok = load_tokenizer(path)
    t = load_chat_template(str(path), tok)
    assert t.origin == "model" and sorted(t.sources) == ["default", "tool_use"]
    msgs = [{"role": "user", "content": "the king"}]
    assert t.render(msgs) == "<|im_start|>user\nthe king<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(msgs, tools=TOOLS) == "tools:1"
    ids = t.encode(msgs)
    im_start, im_end = len(tok._pieces) - 2, len(tok._pieces) - 1
    assert ids[:2] == [1, im_start] and ids.count(1) == 1 and ids.count(im_end) == 1  # one BOS, specials parsed
    assert im_end in t.stop_ids and 2 in t.stop_ids


def test_a_model_s_broken_template_fails_chats_only(tmp_path, caplog):
    """Loading still works (run and completions do not need it); each chat gets the reason, as a UsageError."""
    from edgemoe.tokenizer import load_tokenizer

    path = tmp_path / "v.gguf"
    write_vocab(path, [], "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    t = load_chat_template(str(path), load_tokenizer(path))
    assert t.origin == "model" and 2 in t.stop_ids
    assert "chat requests will fail until --chat-template FILE" in caplog.text
    with pytest.raises(UsageError, match=r"^the model's chat template does not compile \(line 2: .*\); fix it, or "
                                         "pass --chat-template FILE$"):
        t.encode([{"role": "user", "content": "x"}])


def test_hf_directory_templates(tmp_path):
    import json

    from edgemoe.chat.sources import hf_templates

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert hf_templates(str(tmp_path)) == {"default": "A"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "T"}]}))
    assert hf_templates(str(tmp_path)) == {"default": "A", "tool_use": "T"}
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins over tokenizer_config.json, as in transformers
    assert hf_templates(str(tmp_path)) == {"default": "J"}
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("R")
    assert hf_templates(str(tmp_path)) == {"default": "J", "rag": "R"}


def test_one_bos_and_end_of_turn_on_real_vocabularies(llamacpp_models):
    """Llama 3: the template writes <|begin_of_text|> and the vocabulary adds BOS: one BOS, as llama.cpp's server
    (it drops the template's). Qwen 2: no BOS at all. Control tokens are parsed; the turn's end token stops."""
    from edgemoe.tokenizer import load_tokenizer

    msgs = CONVERSATIONS["multi_turn"]["messages"]
    tok = load_tokenizer(llamacpp_models / "ggml-vocab-llama-bpe.gguf")
    source = llamacpp_models / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    t = load_chat_template(str(llamacpp_models / "ggml-vocab-llama-bpe.gguf"), tok, override=str(source))
    assert t.origin == "file" and t.bos_token == "<|begin_of_text|>"
    text = t.render(msgs)
    ids = t.encode(msgs)
    assert text.startswith("<|begin_of_text|>") and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids == tok.encode(text, add_bos=False)
    eot = tok.encode("<|eot_id|>", add_bos=False)
    assert len(eot) == 1 and eot[0] in t.stop_ids and ids.count(eot[0]) == 4  # the template adds a system turn

    tok = load_tokenizer(llamacpp_models / "ggml-vocab-qwen2.gguf")
    source = llamacpp_models / "Qwen-Qwen2.5-7B-Instruct.jinja"
    t = load_chat_template(str(llamacpp_models / "ggml-vocab-qwen2.gguf"), tok, override=str(source))
    ids = t.encode(msgs)
    im_start, im_end = (tok.encode(s, add_bos=False) for s in ("<|im_start|>", "<|im_end|>"))
    assert ids[0] == im_start[0] and ids.count(im_start[0]) == 5 and im_end[0] in t.stop_ids


def test_end_of_turn_ids(tmp_path):
    from edgemoe.tokenizer import load_tokenizer

    harmony = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|turn_done|>"]
    write_vocab(tmp_path / "h.gguf", harmony)
    tok = load_tokenizer(tmp_path / "h.gguf")
    ids = {p: tok.encode(p, add_bos=False)[0] for p in harmony}
    got = end_of_turn_ids(tok)
    # gpt-oss: "<|end|>" ends a message inside the reply (its analysis channel); the reply ends at return/call
    assert {ids["<|return|>"], ids["<|call|>"], 2} <= got and ids["<|end|>"] not in got
    assert ids["<|turn_done|>"] not in got
    custom = ChatTemplate({"default": "{% for m in messages %}{{ m['content'] }}<|turn_done|>{% endfor %}"},
                          origin="file", label="t")
    assert ids["<|turn_done|>"] in end_of_turn_ids(tok, custom)  # the token the template closes a turn with


# ------------------------------------------------------------------------------------------- served and run

@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """(path, its tokenizer, the <|end_of_turn|> id): a tiny Mixtral GGUF carrying OPENCHAT as its template, whose
    output head makes <|end_of_turn|> the greedy first token after CHAT_MESSAGES."""
    import torch
    from mixtral_factory import make_hf_mixtral

    from edgemoe.formats.gguf_export import export_mixtral_gguf
    from edgemoe.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("chat")
    vocab = d / "vocab.gguf"
    write_vocab(vocab, ["<|end_of_turn|>"], OPENCHAT)
    tok = load_tokenizer(vocab)
    eot = tok.vocab_size - 1
    ids = load_chat_template(str(vocab), tok).encode(CHAT_MESSAGES)
    hf, cfg, tensors = make_hf_mixtral(vocab=tok.vocab_size, hidden=64, layers=2)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].numpy()  # (V,)
    best = int(np.argmax(logits))
    head = tensors["lm_head.weight"]  # (V, D)
    head[eot] = head[best] * (2.0 if logits[best] > 0 else 0.5)  # its logit beats the best one's
    path = d / "chat.gguf"
    export_mixtral_gguf(path, cfg, tensors, tokenizer_from=vocab)
    return str(path), tok, eot


CHAT_MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king is dead"}]


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("sock") / "edgemoe.sock")
    proc = start(["-m", served_model[0], "--socket", sock, "--ctx", "256"], sock, sock + ".log")
    yield sock
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    with open(sock + ".log") as f:
        assert "chat requests use the model's chat template (model)" in f.read()


def client(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=120)


def test_served_gguf_applies_its_template_and_stops_at_end_of_turn(server, served_model):
    path, tok, eot = served_model
    template = load_chat_template(path, tok)
    text = template.render(CHAT_MESSAGES)
    assert text == "<s>GPT4 Correct System: be brief<|end_of_turn|>GPT4 Correct User: the king is dead" \
                   "<|end_of_turn|>GPT4 Correct Assistant:"
    with client(server) as c:
        assert c.get("/v1/models").json()["data"][0]["chat_template"] == "model"
        chat = c.post("/v1/chat/completions", json={"messages": CHAT_MESSAGES, "max_tokens": 4,
                                                     "temperature": 0}).json()
        # the same prompt as text through /v1/completions: its first token is the end of turn, which does not stop it
        plain = c.post("/v1/completions", json={"prompt": text[len("<s>"):], "max_tokens": 3,
                                                "temperature": 0}).json()
        refused = c.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert chat["usage"]["prompt_tokens"] == len(template.encode(CHAT_MESSAGES)) == plain["usage"]["prompt_tokens"]
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["token_ids"] == [eot] and choice["message"]["content"] == ""
    assert plain["choices"][0]["token_ids"][0] == eot and plain["choices"][0]["finish_reason"] == "length"
    assert refused.status_code == 400
    err = refused.json()["error"]
    assert err["message"] == "the model's chat template cannot render these messages: This template has no tool role"
    assert err["param"] == "messages"


def test_chat_template_flag_overrides_the_model_s(served_model, tmp_path):
    """--chat-template FILE: the Session's template, and the prompt ids the server's make_job builds."""
    from edgemoe.cli import build_parser
    from edgemoe.config import config_from_args
    from edgemoe.engine.session import Session
    from edgemoe.sampling import SamplingParams
    from edgemoe.server.app import Service
    from edgemoe.server.schemas import parse_request

    path, tok, eot = served_model
    f = tmp_path / "chatml.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}\n")
    args = build_parser().parse_args(["run", "-m", path, "--chat-template", str(f)])
    session = Session(args, config_from_args(args), progress=False)
    try:
        t = session.chat_template
        assert t.origin == "file" and eot in t.stop_ids  # the vocabulary's end-of-turn token still ends chats
        assert t.render(CHAT_MESSAGES) == "[system] be brief\n[user] the king is dead\n[assistant]"
        engine = SimpleNamespace(core=SimpleNamespace(model=session.model))  # what make_job reads of the engine
        service = Service(engine, session.tokenizer, "chat.gguf", 256, SamplingParams(), chat_template=t)
        job = service.make_job(parse_request({"messages": CHAT_MESSAGES, "max_tokens": 2}, chat=True), lambda e: None)
        assert job.prompt_ids == tok.encode("[system] be brief\n[user] the king is dead\n[assistant]")
        assert job.stop_ids == t.stop_ids
        job = service.make_job(parse_request({"prompt": "the king", "max_tokens": 2}, chat=False), lambda e: None)
        assert job.stop_ids == frozenset()
    finally:
        session.close()


def test_broken_template_file_is_one_line_exit_2(served_model, tmp_path, capsys):
    from edgemoe.cli import main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    for argv in (["run", "-m", served_model[0], "-p", "the", "-n", "1", "--chat-template", str(bad)],
                 ["serve", "-m", served_model[0], "--socket", str(tmp_path / "s.sock"), "--chat-template", str(bad)],
                 ["run", "-m", served_model[0], "--chat-template", str(tmp_path / "missing.jinja")]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (serve logs "loading")
        assert len(err) == 1 and err[0].startswith("edgemoe: error: --chat-template "), err
    main(["run", "-m", served_model[0], "-p", "the", "-n", "1", "--chat-template", str(bad)])
    assert "bad.jinja does not compile (line 2: " in capsys.readouterr().err
