"""Speculative decoding: greedy output is token-identical with and without every proposer (resident and
streamed, alone and served to concurrent clients); sampled output is distributed exactly as plain sampling
(chi-square against the exact distribution, with a broken acceptance rule shown to fail it); a draft whose
tokenizer differs is refused with one line."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
from mixtral_factory import make_hf_mixtral, tiny_gguf_with_vocab
from reference_runs import engine_greedy
from scipy.stats import chi2

from edgemoe.cli import main
from edgemoe.default_model import write_vocab
from edgemoe.engine.core import generate
from edgemoe.engine.gate import Gate, expected_tokens
from edgemoe.engine.proposers import DraftModelProposer, LookupProposer, SelfProposer, lookup
from edgemoe.experts.setup import StreamOptions
from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.loader import load_model
from edgemoe.models.moe import DraftRouting
from edgemoe.sampling import SamplingParams
from edgemoe.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0.0)
# Repeats, so prompt lookup has n-grams to propose; the last holds most of the vocabulary once, so a 1-token
# lookup matches whatever a random model says.
PROMPTS = [[1, 40, 41, 42, 43, 40, 41, 42, 43, 40, 41], [1, 7, 300, 12, 5, 99, 7, 300], [1, 250],
           [1] + list(range(3, 200))]
N = 24


def test_lookup_proposes_what_followed_the_longest_recent_match():
    h = [5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(h, 2) == [7, 8]  # "1 2 3" last occurred before "7 8"
    assert lookup(h, 10) == [7, 8, 1, 2, 3]
    assert lookup([4, 5, 6, 7], 3) == []  # no repeated n-gram
    assert lookup([1, 2, 1, 2], 3, min_match=2) == [1, 2]
    assert lookup([9, 1, 1], 3, min_match=2) == []  # a 1-token match is too short


def test_expected_tokens_per_pass():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert math.isclose(expected_tokens(0.5, 2), 1 + 0.5 + 0.25)


# ---------------------------------------------------------------- greedy identity

SHAPES = {  # (qtype, expert qtype, make_hf_mixtral kwargs)
    "f32-gqa2": ("F32", None, dict(hidden=64, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)),
    "q8q4-top3": ("Q8_0", "Q4_0", dict(hidden=128, layers=3, heads=4, kv_heads=1, experts=8, top_k=3, seed=3)),
    "q8q4k-top1": ("Q8_0", "Q4_K", dict(hidden=256, intermediate=256, layers=2, heads=4, kv_heads=4, experts=4,
                                         top_k=1, seed=4)),
}


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    write_vocab(str(d / "vocab.gguf"))
    return d


@pytest.fixture(scope="module")
def models(vocab_dir):
    """name → GGUF path of random targets of several shapes, all with the default word vocabulary; "draft" is a
    smaller random model with the same vocabulary."""
    vocab = str(vocab_dir / "vocab.gguf")
    n_vocab = load_tokenizer(vocab).vocab_size
    out = {}
    for name, (qt, eqt, kw) in {**SHAPES, "draft": ("Q8_0", "Q8_0", dict(hidden=64, layers=1, seed=9))}.items():
        _, cfg, tensors = make_hf_mixtral(vocab=n_vocab, **kw)
        out[name] = str(vocab_dir / f"{name}.gguf")
        export_mixtral_gguf(out[name], cfg, tensors, qtype=qt, expert_qtype=eqt, tokenizer_from=vocab)
    return out


def _stream(path: str, fraction: float) -> StreamOptions:
    """Streaming with a cache of `fraction` of the model's experts."""
    loaded = load_model(path, StreamOptions.from_budget(1))
    ex = loaded.model.experts
    total = sum(e.nbytes for layer in ex.extents for e in layer)
    ex.close()
    return StreamOptions.from_budget(fraction * total / 2**20)


def _proposer(kind: str, target, models):
    if kind == "lookup":
        return LookupProposer(min_match=1)
    if kind == "self":
        return SelfProposer(target, 1.0, DraftRouting(1))
    if kind == "self-strict":  # stops a branch (part-way through its pass) once 10 % of routing was not in RAM
        return SelfProposer(target, 0.1, DraftRouting(1))
    draft = target if kind == "draft-same" else load_model(models["draft"]).model
    return DraftModelProposer(draft, 1.0)


@pytest.mark.parametrize("where", ["resident", "streamed-25%"])
@pytest.mark.parametrize("kind", ["lookup", "self", "self-strict", "draft-other", "draft-same"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_tokens_identical_with_every_proposer(models, shape, kind, where):
    """Every step drafts k = 4 tokens (gate not adaptive), so drafts are verified, accepted and rejected."""
    path = models[shape]
    stream = _stream(path, 0.25) if where != "resident" else None
    target = load_model(path, stream).model
    drafted = accepted = 0
    try:
        for prompt in PROMPTS:
            plain = generate(target, prompt, N, GREEDY, eos=False).tokens
            gate = Gate([_proposer(kind, target, models)], 4, adaptive=False)
            req = generate(target, prompt, N, GREEDY, gate=gate, eos=False)
            assert req.tokens == plain, f"{kind} on {shape} ({where}) diverged from plain greedy decoding"
            drafted, accepted = drafted + req.drafted, accepted + req.accepted
    finally:
        target.experts.close()
    assert drafted > 0 or kind == "self-strict"
    if kind == "draft-same":
        assert accepted == drafted  # the target drafting for itself is always right
    if kind == "draft-other":
        assert accepted < drafted  # a random other model is often wrong: rejections were exercised


@pytest.mark.parametrize("spec", ["lookup", "self", "draft", "auto"])
def test_default_model_greedy_identical_through_run(spec, capsys):
    """The embedded model (real routing locality) with its shipped draft, through `edgemoe run`."""
    args = ["run", "-p", "ROMEO. ", "-n", "48", "--temp", "0", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--spec", spec, "--draft-model", "default", "--draft-max", "6"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["token_ids"] == plain["token_ids"]
    s = r["speculative"]
    assert s["proposer"].startswith(spec) and 0 <= s["accepted"] <= s["drafted"]


# ---------------------------------------------------------------- temperature > 0: the distribution

def _exact_pair_distribution(model, prompt, params):
    """P(t1, t2) of plain sampling: the sampling chain's distribution after the prompt, then after each t1."""
    from edgemoe.sampling import Sampler

    s = Sampler(params, model.args.vocab_size)
    cache = model.new_cache(len(prompt) + 3)
    first = s.distribution(model.forward(np.asarray(prompt), cache)[-1], prompt)
    base = cache.length
    out = {}
    for t1, p1 in zip(*first):
        cache.length = base
        ids, probs = s.distribution(model.forward(np.asarray([t1]), cache)[-1], prompt + [int(t1)])
        for t2, p2 in zip(ids, probs):
            out[(int(t1), int(t2))] = p1 * p2
    return out


def _chi_square_p(counts: dict, exact: dict, n: int) -> float:
    """p-value of the counts under the exact distribution; cells expecting < 5 draws are pooled."""
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for key, p in exact.items():
        if n * p >= 5:
            obs.append(counts.get(key, 0))
            exp.append(n * p)
        else:
            pool_o += counts.get(key, 0)
            pool_e += n * p
    pool_o += sum(c for k, c in counts.items() if k not in exact)  # impossible pairs land here
    obs.append(pool_o)
    exp.append(max(pool_e, 1e-9))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(chi2.sf(stat, len(obs) - 1))


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A tiny target and a different tiny draft over the same word vocabulary."""
    d = tmp_path_factory.mktemp("chi")
    path, _, _ = tiny_gguf_with_vocab(d)
    vocab = str(d / "vocab.gguf")
    _, cfg, tensors = make_hf_mixtral(vocab=load_tokenizer(vocab).vocab_size, hidden=64, layers=1, seed=11)
    draft = str(d / "draft.gguf")
    export_mixtral_gguf(draft, cfg, tensors, tokenizer_from=vocab)
    return path, draft


@pytest.mark.parametrize("rule", ["speculative", "broken"])
@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_sampled_pairs_follow_plain_sampling(small_pair, kind, rule, monkeypatch):
    """The first two sampled tokens (the second one verified from a draft) with speculation, counted over many
    seeds, against the exact distribution of plain sampling. With the acceptance test removed (every draft
    token kept) the same test must fail: it has the power to catch a wrong rule."""
    if rule == "broken":
        monkeypatch.setattr("edgemoe.engine.core.verify_token", lambda *a: (True, None))
    target = load_model(small_pair[0]).model
    draft = load_model(small_pair[1]).model
    # A flat target (temperature 1.5) over 6 candidates. The prompt holds nearly every token once, so prompt
    # lookup (1-token matches) proposes whatever followed the first sampled token there.
    params = SamplingParams(temperature=1.5, top_k=6, top_p=1.0, min_p=0.0)
    V = target.args.vocab_size
    prompt = [1] + np.random.default_rng(0).permutation(np.arange(3, V)).tolist()[:200]
    exact = _exact_pair_distribution(target, prompt, params)
    n, counts = 1200, {}
    for seed in range(n):
        p = SamplingParams(**{**params.__dict__, "seed": seed})
        proposer = DraftModelProposer(draft, 1.0) if kind == "draft" else LookupProposer(min_match=1)
        req = generate(target, prompt, 2, p, gate=Gate([proposer], 1, adaptive=False), eos=False)
        key = tuple(req.tokens)
        counts[key] = counts.get(key, 0) + 1
        assert req.drafted == 1 or kind == "lookup"
    pval = _chi_square_p(counts, exact, n)
    if rule == "speculative":
        assert pval > 1e-3, f"speculative sampling changed the distribution (p = {pval:.2e})"
    else:
        assert pval < 1e-3, f"the test did not notice a broken acceptance rule (p = {pval:.2e})"


# ---------------------------------------------------------------- refusals and the service

def test_mismatched_draft_tokenizer_is_refused(vocab_dir, models, tmp_path, capsys):
    from edgemoe.formats.gguf_vocab import write_llama_vocab

    tok = load_tokenizer(str(vocab_dir / "vocab.gguf"))
    pieces = list(tok._pieces)
    pieces[17] = pieces[17] + "x"
    bad_vocab = str(tmp_path / "bad-vocab.gguf")
    write_llama_vocab(bad_vocab, pieces, [0.0] * len(pieces), [1] * len(pieces), bos=tok.bos_id, eos=tok.eos_id,
                      unk=0)
    _, cfg, tensors = make_hf_mixtral(vocab=len(pieces), hidden=64, layers=1, seed=2)
    bad = str(tmp_path / "bad-draft.gguf")
    export_mixtral_gguf(bad, cfg, tensors, tokenizer_from=bad_vocab)
    capsys.readouterr()
    code = main(["run", "-m", models["f32-gqa2"], "-p", "the king", "-n", "4", "--spec", "draft", "--draft-model", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "tokenizer" in err[0] and "token 17" in err[0], err


def test_served_greedy_identical_with_speculation(models, tmp_path):
    """8 concurrent clients on a streamed model with a small cache, speculation `auto` over all three proposers:
    each reply equals plain single-sequence greedy decoding."""
    from test_server import at_once, client, start_server

    path = models["q8q4-top3"]
    sock = str(tmp_path / "spec.sock")
    proc = start_server(path, sock, "--cache-mb", "0.3", "--spec", "auto", "--draft-model", models["draft"],
                        "--draft-max", "4", "--set", "batching.max_batch=8", "--set", "batching.max_queue=8")
    rng = np.random.default_rng(5)
    prompts = [PROMPTS[i % 3] + rng.integers(3, 300, size=int(rng.integers(1, 6))).tolist() for i in range(8)]
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        with client(sock) as c:
            r = c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 16, "temperature": 0})
        results[i] = r.json()["choices"][0]["token_ids"]

    try:
        at_once(ask, 8)
        with client(sock) as c:
            health = c.get("/health").json()
            metrics = c.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert [results[i] for i in range(8)] == [engine_greedy(path, p, 16) for p in prompts]
    assert health["engine"]["streaming"] and health["engine"]["speculative"].startswith("auto")
    assert "edgemoe_speculative_draft_tokens_total" in metrics
    assert "edgemoe_speculative_accepted_tokens_total" in metrics


def test_gate_keeps_the_faster_arm_and_retries_a_loser_ever_less():
    """The gate's arms on made-up step timings: a proposer slower than plain decoding runs on a shrinking share
    of the steps; once it is faster it is found again and kept."""
    from edgemoe.engine.gate import WINDOW

    class Proposer:
        name = "lookup"  # free to draft: it could pay at high acceptance

    g = Gate([Proposer()], 4)
    for rows in range(1, 18):
        g.costs.record(rows, 1e-3 * (1 + 0.1 * (rows - 1)))
    active: list[int] = []

    def run(windows, tok_s):
        for _ in range(windows * WINDOW):
            active.append(g.active)
            g.step_done(1, 1.0 / tok_s[g.active])

    run(100, {0: 100.0, 1: 80.0})  # the proposer loses
    late = active[-60 * WINDOW:]
    assert 0 < late.count(1) <= 0.1 * len(late)
    start = len(active)
    run(100, {0: 100.0, 1: 150.0})  # now it wins
    assert active[start:][-40 * WINDOW:].count(1) >= 0.9 * 40 * WINDOW
