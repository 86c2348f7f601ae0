"""The OpenAI API as clients send it: the official `openai` client (sync and async, over the UNIX socket and over
loopback TCP) against a real `edgemoe serve` of the embedded default model, one server for the module.

Oracles: `edgemoe run --temp 0` (greedy tokens), a NumPy greedy loop over the model's logits with OpenAI's
penalty formula, and the sampler against the same formula on random logits."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import httpx
import numpy as np
import openai
import pytest

from edgemoe.cli import main
from edgemoe.default_model import default_model_path
from edgemoe.sampling import Sampler, SamplingParams
from tools.serve_process import start

PROMPT = "ROMEO.\n"
MAX_BATCH = 8


@pytest.fixture(scope="module")
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sock(tmp_path_factory, port):
    path = str(tmp_path_factory.mktemp("openai") / "edgemoe.sock")
    proc = start(["--socket", path, "--tcp", f"127.0.0.1:{port}", "--ctx", "512",
                  "--set", f"batching.max_batch={MAX_BATCH}"], path, path + ".log")
    yield path
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def oai(sock):
    http = httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=120)
    with openai.OpenAI(base_url="http://edgemoe/v1", api_key="x", http_client=http, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(oai) -> str:
    return oai.models.list().data[0].id


def run_greedy(capsys, prompt: str, n: int) -> list[int]:
    """`edgemoe run --temp 0 --json` on the default model: its token ids."""
    assert main(["run", "-p", prompt, "-n", str(n), "--temp", "0", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["token_ids"]


def ids_of(choice) -> list[int]:
    return choice.token_ids  # edgemoe's extension field; the client keeps extra fields


def chunks_by_choice(stream) -> tuple[dict[int, str], dict[int, str], list]:
    """(text by choice index, finish_reason by index, every chunk) of a completions or chat stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


# ------------------------------------------------------------------------------------------ greedy = run


def test_completion_greedy_equals_run_and_streams_usage(oai, model, capsys):
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert ids_of(choice) == run_greedy(capsys, PROMPT, 12)
    assert r.usage.completion_tokens == len(ids_of(choice)) and r.object == "text_completion"
    stream = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    texts, reasons, chunks = chunks_by_choice(stream)
    assert texts == {0: choice.text} and reasons == {0: choice.finish_reason}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_accepts_what_clients_send(oai, model):
    plain = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Good morrow, sir"}],
                                        max_tokens=10, temperature=0)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Good morrow"}, {"type": "text", "text": ", sir"}]}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = oai.chat.completions.create(
        model=model, messages=msgs, max_completion_tokens=10, temperature=0, presence_penalty=0, frequency_penalty=0,
        logit_bias={}, response_format={"type": "text"}, tools=tools, tool_choice="none", parallel_tool_calls=False,
        n=1, user="u", metadata={"k": "v"}, store=False, service_tier="auto", seed=5, top_p=1,
        extra_body={"cache_prompt": True, "mirostat": 0})  # other servers' fields: ignored
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert ids_of(r.choices[0]) == ids_of(plain.choices[0]) and r.object == "chat.completion"
    stream = oai.chat.completions.create(model=model, messages=msgs, max_completion_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    texts, reasons, chunks = chunks_by_choice(stream)
    assert texts == {0: plain.choices[0].message.content} and reasons == {0: plain.choices[0].finish_reason}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_async_client_and_tcp_give_the_same_tokens(sock, port, oai, model):
    whole = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       temperature=0)

    async def ask():
        http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock), timeout=120)
        async with openai.AsyncOpenAI(base_url="http://edgemoe/v1", api_key="x", http_client=http) as c:
            a = await c.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
            stream = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=8, temperature=0, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            return a, text

    a, streamed = asyncio.run(ask())
    assert ids_of(a.choices[0]) == ids_of(whole.choices[0]) and streamed == chat.choices[0].message.content
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as tcp:
        t = tcp.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        assert ids_of(t.choices[0]) == ids_of(whole.choices[0])
        assert tcp.models.retrieve(model).id == model


# ------------------------------------------------------------------------------- n, prompt lists, echo


def test_n_choices_are_seeded_per_choice_and_reproducible(oai, model):
    ask = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    r = oai.completions.create(n=3, **ask)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = oai.completions.create(n=3, **ask)
    assert [ids_of(c) for c in again.choices] == [ids_of(c) for c in r.choices]
    assert len({tuple(ids_of(c)) for c in r.choices}) > 1  # three seeds, not one sequence three times
    for k in range(3):  # choice k is the request alone with seed + k
        alone = oai.completions.create(n=1, **{**ask, "seed": 7 + k})
        assert ids_of(alone.choices[0]) == ids_of(r.choices[k])
    assert r.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == sum(len(ids_of(c)) for c in r.choices)
    texts, reasons, chunks = chunks_by_choice(oai.completions.create(n=3, stream=True, **ask))
    assert texts == {c.index: c.text for c in r.choices} and set(reasons) == {0, 1, 2}
    order = [ch.choices[0].index for ch in chunks if ch.choices]
    assert order.index(1) < max(i for i, x in enumerate(order) if x == 0)  # interleaved, not one after another
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=3,
                                       max_tokens=6, temperature=1.0, seed=7)
    assert [c.index for c in chat.choices] == [0, 1, 2]


def test_a_list_of_prompts_is_one_choice_each(oai, model):
    prompts = [PROMPT, "JULIET.\n", "The king"]
    r = oai.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    singles = [oai.completions.create(model=model, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [ids_of(c) for c in r.choices] == [ids_of(s.choices[0]) for s in singles]
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    both = oai.completions.create(model=model, prompt=prompts[:2], n=2, max_tokens=4, temperature=0)
    assert [ids_of(c) for c in both.choices] == [ids_of(singles[0].choices[0])[:4]] * 2 + \
        [ids_of(singles[1].choices[0])[:4]] * 2


def test_echo_prepends_the_prompt(oai, model):
    plain = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                  echo=True).choices[0].text == PROMPT + plain
    texts, _, _ = chunks_by_choice(oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                                          echo=True, stream=True))
    assert texts == {0: PROMPT + plain}


# ---------------------------------------------------------------------------------------------- logprobs


def _utf8_offsets(tokens: list[str]) -> list[int]:
    return [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_completion_logprobs_are_text_with_offsets(oai, model):
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=3,
                               logit_bias={"13": 4})  # "<0x0A>" likelier: byte-fallback tokens in the reply
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and "\n" in lp.tokens
    assert not any("<0x" in t or "\u2581" in t for t in lp.tokens)
    assert lp.text_offset == _utf8_offsets(lp.tokens)
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and tok in top and top[tok] == pytest.approx(tlp, abs=1e-9)  # 3 + the chosen
    chosen = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0,
                                    logit_bias={"13": 4})
    assert [list(t) for t in chosen.choices[0].logprobs.top_logprobs] == [[t] for t in lp.tokens]  # chosen only
    texts, _, chunks = chunks_by_choice(oai.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                                               temperature=0, logprobs=3, logit_bias={"13": 4},
                                                               stream=True))
    streamed = [(t, o) for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t, o in zip(ch.choices[0].logprobs.tokens, ch.choices[0].logprobs.text_offset)]
    assert streamed == list(zip(lp.tokens, lp.text_offset))


def test_chat_logprobs_have_tokens_and_bytes(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes) == t.token.encode() and len(t.top_logprobs) == 2
        assert all(bytes(a.bytes) == a.token.encode() for a in t.top_logprobs)
    none = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True)
    assert all(t.top_logprobs == [] for t in none.choices[0].logprobs.content)


def test_partial_utf8_tokens_are_escaped_with_their_bytes(oai, model):
    """0xC3 alone (the first byte of "é") forced at every step: no token is a whole character."""
    ask = dict(model=model, max_tokens=4, temperature=0, logit_bias={"198": 100})  # 198 = <0xC3>
    chat = oai.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], logprobs=True, **ask)
    assert [(t.token, t.bytes) for t in chat.choices[0].logprobs.content] == [("\\xc3", [195])] * 4
    done = oai.completions.create(prompt=PROMPT, logprobs=1, **ask).choices[0]
    assert done.logprobs.tokens == ["bytes:\\xc3"] * 4 and done.text == "\ufffd" * 4
    assert done.logprobs.text_offset == [0, 0, 1, 2]  # a byte starts where its (broken) character starts


# --------------------------------------------------------------------------------------------- penalties


def _openai_penalised(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's definition: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c = counts in the generated text."""
    c = np.bincount(np.asarray(generated, dtype=np.int64), minlength=logits.shape[0])  # (V,)
    return logits.astype(np.float64) - c * frequency - (c > 0) * presence


@pytest.mark.parametrize("presence, frequency", [(0.7, 0.0), (0.0, 1.3), (-1.5, 2.0), (2.0, -2.0)])
def test_sampler_penalties_follow_openai_formula(presence, frequency):
    rng = np.random.default_rng(0)
    V = 50
    logits = rng.normal(size=V).astype(np.float32)
    prompt = rng.integers(0, V, size=12).tolist()  # not counted: OpenAI penalises the generated text only
    generated = [3, 3, 3, 9, 9, 41]
    bias = ((5, 2.5), (3, -1.0))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=presence,
                            frequency_penalty=frequency, logit_bias=bias)
    s = Sampler(params, V, n_prompt=len(prompt))
    ids, probs = s.distribution(logits, prompt + generated)
    want = _openai_penalised(logits, generated, presence, frequency)
    for t, b in bias:
        want[t] += b
    want = np.exp(want - want.max())
    want /= want.sum()
    full = np.zeros(V)
    full[ids] = probs
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-7)
    greedy = Sampler(SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency,
                                    logit_bias=bias), V, n_prompt=len(prompt))
    top = int(np.argmax(want))
    assert greedy.sample(logits, prompt + generated) == top  # sample and distribution see the same chain
    assert greedy.distribution(logits, prompt + generated)[0].tolist() == [top]


def test_sampled_tokens_follow_the_penalised_distribution():
    """`sample` draws from what `distribution` (speculative verification's p) says, penalties included."""
    rng = np.random.default_rng(1)
    V = 12
    logits = rng.normal(size=V).astype(np.float32)
    history = [0, 1, 2, 3, 3, 3, 7]
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=1.0,
                            frequency_penalty=0.5, logit_bias=((4, -1.0),), seed=3)
    s = Sampler(params, V, n_prompt=2)
    ids, probs = s.distribution(logits, history)
    p = np.zeros(V)
    p[ids] = probs
    n = 20000
    freq = np.bincount([s.sample(logits, history) for _ in range(n)], minlength=V) / n
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)  # 4 sigma per token


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("logit_bias", ((1, 101.0),)), ("logit_bias", ((1, 1.0), (1, 2.0)))])
def test_sampler_refuses_out_of_range_penalties(field, value):
    from edgemoe.errors import UsageError

    with pytest.raises(UsageError, match=field):
        Sampler(SamplingParams(**{field: value}), 10)


def test_served_penalties_equal_a_numpy_greedy_loop(oai, model):
    """The server's greedy tokens with both penalties equal argmax over the model's logits after OpenAI's formula."""
    from edgemoe.loader import load_model

    presence, frequency = 0.5, 1.5
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, presence_penalty=presence,
                               frequency_penalty=frequency)
    loaded = load_model(default_model_path())
    m, ids = loaded.model, loaded.tokenizer.encode(PROMPT)
    cache = m.new_cache(64)
    logits = m.forward(np.asarray(ids), cache)[-1]
    out: list[int] = []
    for _ in range(12):
        out.append(int(np.argmax(_openai_penalised(logits, out, presence, frequency))))
        logits = m.forward(np.asarray(out[-1:]), cache)[-1]
    assert ids_of(r.choices[0]) == out
    plain = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert ids_of(plain.choices[0]) != out  # the penalties did something


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("chat, fields, param, says", [
    (False, {"suffix": "the end"}, "suffix", "not supported"),
    (False, {"best_of": 3}, "best_of", "not supported"),
    (False, {"presence_penalty": 2.5}, "presence_penalty", "-2 to 2"),
    (False, {"logit_bias": {"99999": 1}}, "logit_bias.99999", "outside the vocabulary"),
    (False, {"logit_bias": {"5": 200}}, "logit_bias.5", "-100 to 100"),
    (False, {"n": 0}, "n", "from 1"),
    (False, {"echo": True, "logprobs": 2}, "echo", "logprobs"),
    (True, {"response_format": {"type": "json_object"}}, "response_format", '"JSON" in the messages'),
    (True, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "cannot be compiled"),
    (True, {"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name", "letters"),
    (True, {"tool_choice": "required"}, "tool_choice", "without 'tools'"),
    (True, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}]},
     "messages[0].content[1]", "image input"),
    (True, {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]", "audio input"),
    (True, {"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "disagree"),
    (True, {"modalities": ["text", "audio"]}, "modalities", "text only"),
])
def test_unsupported_fields_are_openai_shaped_400s(oai, model, chat, fields, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            oai.chat.completions.create(**{"model": model, "messages": [{"role": "user", "content": "Hi"}], **fields})
        else:
            oai.completions.create(**{"model": model, "prompt": PROMPT, **fields})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and says in err["message"], err
    assert err["type"] == "invalid_request_error" and says in str(e.value)


def test_models_and_unknown_routes_are_openai_shaped(oai, model, sock):
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4")
    assert "gpt-4" in e.value.body["message"] and e.value.body["param"] == "model"
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe") as c:
        r = c.get("/v1/engines")
        assert r.status_code == 404 and r.json()["error"]["code"] == 404 and "/v1/engines" in r.json()["error"]["message"]
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "use POST" in r.json()["error"]["message"]


def test_tokenize_and_detokenize(sock):
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe") as c:
        plain = c.post("/tokenize", json={"content": PROMPT}).json()["tokens"]
        special = c.post("/tokenize", json={"prompt": PROMPT, "add_special": True}).json()["tokens"]
        assert special == [1] + plain and plain[-1] == 13  # BOS; "\n" is the byte token <0x0A>
        pieces = c.post("/tokenize", json={"content": PROMPT, "with_pieces": True}).json()["tokens"]
        assert [p["id"] for p in pieces] == plain and pieces[-1]["piece"] == "\n"
        assert c.post("/detokenize", json={"tokens": special}).json() == {"content": PROMPT}
        r = c.post("/detokenize", json={"tokens": [1, 10**6]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = c.post("/tokenize", json={"content": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "content"
