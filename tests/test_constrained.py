"""`response_format` JSON as constrained decoding (engine/grammar.py): the embedded default model writes
Shakespeare, so every reply that parses is the grammar's doing.

Through the official `openai` client against a real `edgemoe serve` (greedy and sampled, streamed and whole,
chat and completions), and without a server: the sampler's mask stage, and no drafts for a constrained
request under speculation."""

from __future__ import annotations

import json
import signal

import httpx
import numpy as np
import openai
import pytest

from edgemoe.default_model import default_model_path
from edgemoe.engine.core import generate
from edgemoe.engine.gate import Gate
from edgemoe.engine.grammar import Grammar
from edgemoe.engine.proposers import LookupProposer
from edgemoe.loader import load_model
from edgemoe.sampling import Sampler, SamplingParams
from tools.serve_process import start

PROMPT = "ROMEO.\n"
# The bounds matter: left to itself the model never closes a string (greedy, it writes "1. 1. 1. ..." for ever)
# nor ends a number ("1622333...0000...").
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
try:
    from jsonschema import validate
except ImportError:  # the test extra lists it; without it, SCHEMA checked by hand
    def validate(obj, schema):
        assert isinstance(obj, dict) and set(obj) == {"name", "age"}, obj
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 24, obj
        assert type(obj["age"]) is int and 0 <= obj["age"] <= 150, obj

JSON_MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who art thou?"}]


@pytest.fixture(scope="module")
def oai(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("constrained") / "edgemoe.sock")
    proc = start(["--socket", path, "--ctx", "512"], path, path + ".log")
    http = httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=120)
    with openai.OpenAI(base_url="http://edgemoe/v1", api_key="x", http_client=http, max_retries=0) as c:
        yield c
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def model(oai) -> str:
    return oai.models.list().data[0].id


def _streamed(stream) -> tuple[str, str]:
    text, reason = "", None
    for ch in stream:
        for c in ch.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text += piece or ""
            reason = c.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0, 0.9])
def test_chat_json_schema_replies_validate(oai, model, temperature, stream):
    kw = dict(model=model, messages=JSON_MESSAGES, max_tokens=200, temperature=temperature, seed=7,
              response_format=FORMAT)
    if stream:
        text, reason = _streamed(oai.chat.completions.create(stream=True, **kw))
    else:
        r = oai.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert reason == "stop", text
    validate(json.loads(text), SCHEMA)


def test_completion_json_schema_and_n_choices(oai, model):
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=200, temperature=0.9, seed=3, n=3,
                               extra_body={"response_format": FORMAT})
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.text
        validate(json.loads(c.text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0, 0.9])
def test_json_object_is_an_object(oai, model, temperature, stream):
    kw = dict(model=model, prompt=PROMPT, max_tokens=200, temperature=temperature, seed=11,
              extra_body={"response_format": {"type": "json_object"}})
    if stream:
        text, reason = _streamed(oai.completions.create(stream=True, **kw))
    else:
        r = oai.completions.create(**kw)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert reason == "stop", text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_object_without_bounds_can_run_to_the_length(oai, model, stream):
    """Any object may hold any string: after `{"` this model writes Shakespeare and never a closing quote, so the
    reply is cut by max_tokens ("length"), as OpenAI's would be; still JSON as far as it goes."""
    kw = dict(model=model, messages=JSON_MESSAGES, max_tokens=30, temperature=0.9, seed=11,
              response_format={"type": "json_object"})
    if stream:
        text, reason = _streamed(oai.chat.completions.create(stream=True, **kw))
    else:
        r = oai.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_too_few_tokens_end_with_length(oai, model, stream):
    kw = dict(model=model, messages=JSON_MESSAGES, max_tokens=4, temperature=0, response_format=FORMAT)
    if stream:
        text, reason = _streamed(oai.chat.completions.create(stream=True, **kw))
    else:
        r = oai.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert reason == "length" and text.startswith('{"')  # cut short, as OpenAI's: not whole JSON


@pytest.mark.parametrize("fmt, messages, says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, JSON_MESSAGES,
     "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, JSON_MESSAGES,
     "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, JSON_MESSAGES, "a JSON schema object"),
    ({"type": "json_schema"}, JSON_MESSAGES, "response_format.json_schema"),
    ({"type": "json_object"}, [{"role": "user", "content": "Hi"}], '"JSON" in the messages'),
])
def test_bad_formats_are_400s_naming_response_format(oai, model, fmt, messages, says):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=messages, max_tokens=8, response_format=fmt)
    err = e.value.body
    assert err["param"].startswith("response_format") and says in err["message"], err


# ------------------------------------------------------------------------------------------ without a server


def test_mask_applies_after_bias_in_sample_and_distribution():
    """A token the mask forbids is never drawn, even with the largest logit bias; both paths see the same set."""
    V = 64
    allowed = np.zeros(V, bool)
    allowed[[3, 17, 40]] = True

    def mask(w):
        w[~allowed] = -np.inf

    rng = np.random.default_rng(0)
    for temperature, top_k in ((0.0, 40), (1.0, 40), (1.0, 0)):
        p = SamplingParams(temperature=temperature, top_k=top_k, min_p=0.0, seed=1, logit_bias=((5, 100.0),))
        s = Sampler(p, V, mask=mask)
        for _ in range(50):
            logits = rng.normal(size=V).astype(np.float32)
            assert allowed[s.sample(logits)]
            ids, probs = s.distribution(logits)
            assert allowed[ids[probs > 0]].all()


def test_constrained_request_takes_no_drafts():
    """Drafts would need masks at positions the matcher has not reached: the engine drafts none for them."""
    loaded = load_model(default_model_path())
    tok, V = loaded.tokenizer, loaded.model.args.vocab_size
    grammar = Grammar.json_schema(SCHEMA, tok, V)
    ids = tok.encode(PROMPT)
    gate = Gate([LookupProposer(min_match=1)], 4, adaptive=False)
    req = generate(loaded.model, ids, 120, SamplingParams(temperature=0), tokenizer=tok, gate=gate, grammar=grammar)
    assert req.drafted == 0 and req.finish_reason == "stop"
    validate(json.loads(tok.decode(req.tokens)), SCHEMA)
    free = generate(loaded.model, ids, 40, SamplingParams(temperature=0), tokenizer=tok,
                    gate=Gate([LookupProposer(min_match=1)], 4, adaptive=False))
    assert free.drafted > 0  # the same gate drafts for a free-text request
