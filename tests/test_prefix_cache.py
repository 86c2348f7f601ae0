"""Prompt-prefix reuse (engine/prefix_cache.py): a request that starts from the KV rows of an earlier or running
sequence gets bit-identical logits and tokens to the same request prefilling its whole prompt (greedy and seeded
sampling; the default model memory-mapped and streamed; one by one, batched, speculative, served to concurrent
clients); every row kept is bit-identical to a fresh one-pass prefill of its tokens; the budget evicts the least
recently used; /metrics counts the reused tokens; 0 MB turns it off."""

from __future__ import annotations

import argparse
import json
import signal
import threading

import httpx
import numpy as np
import pytest

from edgemoe.config import MB, ConfigError, load_config
from edgemoe.default_model import default_model_path
from edgemoe.engine.core import EngineCore, run_to_end
from edgemoe.engine.gate import Gate
from edgemoe.engine.prefix_cache import PrefixCache
from edgemoe.engine.proposers import LookupProposer, SelfProposer
from edgemoe.engine.request import Request
from edgemoe.experts.setup import StreamOptions
from edgemoe.kv_cache import KVCache
from edgemoe.loader import load_model
from edgemoe.models.moe import DraftRouting
from edgemoe.sampling import SamplingParams
from edgemoe.server.engine import Engine
from edgemoe.server.metrics import Metrics, prometheus
from edgemoe.server.scheduler import Scheduler
from tools.serve_process import start

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)  # the whole distribution counts
CHUNK = 16  # prompt tokens per step: prompts span several steps, and reuse moves the chunk boundaries
STREAM_MB = 3  # --cache-mb for the streamed default model: about a quarter of its experts


def words(rng, lo: int, hi: int, n: int) -> list[int]:
    """n token ids from [lo, hi): disjoint ranges make every shared prefix end exactly where it is built to."""
    return rng.integers(lo, hi, n).tolist()


@pytest.fixture(scope="module", params=["resident", "streamed"])
def model(request):
    stream = StreamOptions.from_budget(STREAM_MB) if request.param == "streamed" else None
    m = load_model(default_model_path(), stream).model
    yield m
    m.experts.close()


class Recorder(EngineCore):
    """An engine core that keeps every logits row a request samples from: the bits under test."""

    def __init__(self, model, prefix_cache=None, gate=None, prefill_chunk=CHUNK, metrics=None):
        super().__init__(model, None, prefill_chunk=prefill_chunk, gate=gate, metrics=metrics,
                         prefix_cache=prefix_cache)
        self.eos_ids = set()  # every request runs to its length: more decode steps to compare
        self.logits: dict[int, list[np.ndarray]] = {}

    def _sample(self, req):
        self.logits.setdefault(req.id, []).append(req.logits.copy())
        return super()._sample(req)


def one(core: Recorder, prompt: list[int], n: int, params: SamplingParams) -> tuple[Request, list[np.ndarray]]:
    req = run_to_end(core, Request(prompt, n, params))
    assert req.finish_reason == "length", req.error
    return req, core.logits.pop(req.id)


def same(a: tuple[Request, list], b: tuple[Request, list], what: str) -> None:
    (ra, la), (rb, lb) = a, b
    assert ra.tokens == rb.tokens, f"{what}: tokens differ"
    assert len(la) == len(lb)
    for i, (x, y) in enumerate(zip(la, lb)):
        assert np.array_equal(x, y), f"{what}: logits of step {i} differ by up to {np.abs(x - y).max()}"


def assert_rows_fresh(model, pc: PrefixCache) -> None:
    """Every kept row equals what one pass over the whole sequence writes (the guarantee reuse rests on)."""
    assert pc.entries()
    for e in pc.entries():
        n = e.tokens.shape[0]
        cache = model.new_cache(n)
        model.forward(e.tokens, cache)
        assert np.array_equal(cache.k[:, :, :n], e.k) and np.array_equal(cache.v[:, :, :n], e.v), \
            f"the kept rows of a {n}-token sequence differ from a fresh prefill"


def scenarios(run, rng) -> list[tuple[str, list[int], int, int]]:
    """The reuse cases in order, each run through `run(prompt, n)` → (Request, logits); returns (case, prompt, n,
    prompt tokens a prefix cache must reuse) so both cores see the same prompts."""
    system = words(rng, 3, 500, 40)
    question = words(rng, 500, 1000, 12)
    prompt = system + question
    first = run(prompt, 8)[0]
    turn = prompt + first.tokens + words(rng, 1500, 2048, 6)
    return [
        ("cold", prompt, 8, 0),
        ("the same prompt again", prompt, 8, len(prompt) - 1),  # its last token always runs
        ("shared system prefix, another question", system + words(rng, 1000, 1500, 9), 8, len(system)),
        # the entry holds the reply but its last token, which was sampled and never run
        ("the conversation's next turn", turn, 8, len(prompt) + len(first.tokens) - 1),
        ("diverges mid-way", prompt[:25] + words(rng, 1500, 2048, 10), 6, 25),
        ("a prefix of a kept prompt", prompt[:30], 6, 29),
    ]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_reuse_gives_bit_identical_logits(model, params):
    plain, reuse = Recorder(model), Recorder(model, PrefixCache(64 * MB))
    cases = scenarios(lambda p, n: one(plain, p, n, params), np.random.default_rng(5))
    for case, prompt, n, reused in cases:
        want = one(plain, prompt, n, params)
        got = one(reuse, prompt, n, params)
        assert got[0].reused == reused, f"{case}: reused {got[0].reused} prompt tokens, expected {reused}"
        assert got[0].prefilled == len(prompt)
        same(got, want, case)
    assert_rows_fresh(model, reuse.prefix_cache)
    figures = reuse.prefix_cache.figures()
    assert figures["reused_tokens"] == sum(r for *_, r in cases) and figures["misses"] == 1


def test_whole_prompt_chunk_of_256_reuses_too(model):
    """The default prefill chunk (256): a 300-token prompt prefilled in two steps, then reused in one."""
    rng = np.random.default_rng(8)
    prompt = words(rng, 3, 2048, 300)
    plain, reuse = Recorder(model, prefill_chunk=256), Recorder(model, PrefixCache(64 * MB), prefill_chunk=256)
    want = one(plain, prompt + [7, 9], 4, GREEDY)
    one(reuse, prompt, 4, GREEDY)
    got = one(reuse, prompt + [7, 9], 4, GREEDY)
    assert got[0].reused == 300
    same(got, want, "a kept 300-token prompt + 2 tokens")


def test_batched_requests_reuse_running_and_ended_ones(model):
    """Requests admitted while others run (the server's way): one reuses a running request's committed rows, all
    share batched steps, and each equals the same request run alone without reuse."""
    rng = np.random.default_rng(6)
    system = words(rng, 3, 500, 30)
    prompts = [system + words(rng, 500, 1000, 5), system + words(rng, 1000, 1500, 7), None]
    plain = Recorder(model)
    core = Recorder(model, PrefixCache(64 * MB))
    a = Request(prompts[0], 10, GREEDY)
    core.admit(a)
    while a.logits is None:  # a prefills alone
        core.step([a])
    core.step([a])  # and samples its first token
    prompts[2] = prompts[0] + a.tokens[:1] + words(rng, 1500, 2048, 4)
    b, c = Request(prompts[1], 8, SEEDED), Request(prompts[2], 6, GREEDY)
    core.admit(b)
    core.admit(c)
    assert b.reused == len(system)  # from the running a
    assert c.reused == len(prompts[0]) + 1  # a's prompt and its first token, run in its first decode step
    running = [a, b, c]
    while running:
        core.step(running)
        running = [r for r in running if not r.done]
    for req in (a, b, c):
        want = one(plain, req.prompt_ids, req.max_tokens, req.params)
        same((req, core.logits.pop(req.id)), want, f"request of {len(req.prompt_ids)} tokens")
    assert_rows_fresh(model, core.prefix_cache)


@pytest.mark.parametrize("proposer", ["lookup", "self"])
def test_speculative_requests_keep_only_committed_rows(model, proposer):
    """Verification passes write rows for drafts that are then rejected (a self-draft writes into the target's
    cache): none of them may be kept. Greedy output stays plain greedy's, with or without reuse (tokens only: where
    drafts are rejected, and so which logits are sampled from, depends on the experts in RAM when streaming)."""
    rng = np.random.default_rng(7)
    loop = words(rng, 3, 2048, 6)
    prompt = words(rng, 3, 2048, 10) + loop * 4  # repeats: the lookup proposer has n-grams to draft from

    def gate():
        p = LookupProposer(min_match=1) if proposer == "lookup" else SelfProposer(model, 1.0, DraftRouting(1))
        return Gate([p], 4, adaptive=False)

    plain = Recorder(model)
    spec, spec_reuse = Recorder(model, gate=gate()), Recorder(model, PrefixCache(64 * MB), gate=gate())
    first = one(spec_reuse, prompt, 20, GREEDY)
    assert first[0].drafted > first[0].accepted  # rejected drafts were written and forgotten
    assert first[0].tokens == one(plain, prompt, 20, GREEDY)[0].tokens
    (kept,) = spec_reuse.prefix_cache.entries()
    assert kept.tokens.tolist() == (prompt + first[0].tokens)[:kept.tokens.shape[0]]
    assert kept.tokens.shape[0] <= len(prompt) + len(first[0].tokens)
    assert_rows_fresh(model, spec_reuse.prefix_cache)
    turn = prompt + first[0].tokens + loop
    got = one(spec_reuse, turn, 12, GREEDY)
    assert got[0].reused == kept.tokens.shape[0]
    assert got[0].tokens == one(spec, turn, 12, GREEDY)[0].tokens == one(plain, turn, 12, GREEDY)[0].tokens


class Flaky:
    """The model, whose passes fail while `failing` is set."""

    def __init__(self, model):
        self.model, self.failing = model, False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_batch(self, *a, **kw):
        if self.failing:
            raise RuntimeError("a bad expert read")
        return self.model.forward_batch(*a, **kw)


def test_a_failed_request_is_not_kept_a_cancelled_one_is(model):
    flaky = Flaky(model)
    core = Recorder(flaky, PrefixCache(64 * MB))
    prompt = words(np.random.default_rng(12), 3, 2048, 40)
    req = Request(prompt, 4, GREEDY)
    core.admit(req)
    core.step([req])  # CHUNK prompt tokens in the cache
    flaky.failing = True
    core.step([req])
    assert req.finish_reason == "error" and core.prefix_cache.entries() == []
    flaky.failing = False
    req = Request(prompt, 4, GREEDY)
    core.admit(req)
    assert req.reused == 0
    core.step([req])
    core.end(req, "cancelled")  # the client went away part-way through its prompt: what ran is kept
    (kept,) = core.prefix_cache.entries()
    assert kept.tokens.tolist() == prompt[:CHUNK]
    assert_rows_fresh(model, core.prefix_cache)


# ---------------------------------------------------------------- the cache itself, without a model

def toy_cache(tokens: list[int], length: int | None = None) -> KVCache:
    """A 1-layer, 1-head, d=4 cache whose row p holds the tokens' sum up to p (a function of the prefix)."""
    cache = KVCache(1, 64, 1, 4)
    n = len(tokens) if length is None else length
    prefix_sums = np.cumsum(tokens + [0] * (n - len(tokens)))[:n]
    cache.k[0, 0, :n] = prefix_sums[:, None]
    cache.v[0, 0, :n] = -prefix_sums[:, None]
    cache.length = n
    return cache


def reused(pc: PrefixCache, prompt: list[int]) -> int:
    cache = KVCache(1, 64, 1, 4)
    n = pc.fill(prompt, cache)
    assert cache.length == n
    assert np.array_equal(cache.k[0, 0, :n], toy_cache(prompt[:n]).k[0, 0, :n])
    return n


def test_lru_eviction_within_the_budget():
    seq = {name: [base + i for i in range(10)] for name, base in (("a", 100), ("b", 200), ("c", 300))}
    row = KVCache(1, 1, 1, 4).row_bytes + 8  # + the token id
    pc = PrefixCache(20 * row)  # room for two 10-token sequences
    pc.keep(seq["a"], toy_cache(seq["a"]))
    pc.keep(seq["b"], toy_cache(seq["b"]))
    assert pc.figures()["entries"] == 2 and pc.bytes == 20 * row
    assert reused(pc, seq["a"] + [1]) == 10  # a is used: b is now the least recently used
    pc.keep(seq["c"], toy_cache(seq["c"]))
    assert pc.figures()["evictions"] == 1 and pc.bytes == 20 * row
    assert reused(pc, seq["b"] + [1]) == 0 and reused(pc, seq["a"] + [1]) == 10 and reused(pc, seq["c"] + [1]) == 10
    pc.keep(list(range(21)), toy_cache(list(range(21))))  # more than the whole budget: not kept, nothing evicted
    assert pc.figures()["entries"] == 2


def test_what_is_kept():
    pc = PrefixCache(MB)
    a = list(range(3, 13))
    pc.keep(a, toy_cache(a, length=13))  # rows past the tokens (rejected drafts): not kept
    assert [e.tokens.tolist() for e in pc.entries()] == [a]
    pc.keep(a[:6], toy_cache(a[:6]))  # already held by a longer entry
    pc.keep(a + [50, 51], toy_cache(a + [50, 51]))  # continues a: replaces it
    assert [e.tokens.tolist() for e in pc.entries()] == [a + [50, 51]]
    pc.keep(a[:4] + [60], toy_cache(a[:4] + [60]))  # diverges: both kept
    assert len(pc.entries()) == 2
    assert reused(pc, a[:4] + [60, 61]) == 5 and reused(pc, a + [50, 51]) == 11  # never the last prompt token
    assert reused(pc, [99, 3]) == 0
    pc.track(1, a + [70, 71, 72], toy_cache(a + [70, 71], length=12))  # a running request: its committed rows
    assert reused(pc, a + [70, 71, 72, 73]) == 12
    pc.release(1, keep=False)  # it failed: dropped
    assert len(pc.entries()) == 2 and reused(pc, a + [70, 71, 72, 73]) == 10
    pc.track(2, a + [80], toy_cache(a + [80]))
    pc.release(2, keep=True)
    assert len(pc.entries()) == 3


def test_metrics_count_reused_and_prefilled_tokens(model):
    metrics = Metrics()
    core = Recorder(model, PrefixCache(64 * MB), metrics=metrics)
    engine = Engine(core, Scheduler({"default": 1}, 4, 4))  # attaches the cache's figures (not started)
    prompt = words(np.random.default_rng(9), 3, 2048, 40)
    one(core, prompt, 3, GREEDY)
    one(core, prompt + [5, 6], 3, GREEDY)
    snap = engine.metrics.snapshot()
    assert snap["prompt_tokens_reused"] == 40 and snap["prompt_tokens"] == 40 + 2  # the kept prompt, then [5, 6]
    assert snap["prompt_cache"]["entries"] == 2 and snap["prompt_cache"]["hits"] == 1
    text = prometheus(snap, None)
    assert "edgemoe_prompt_tokens_reused_total 40\n" in text and "edgemoe_prompt_tokens_total 42\n" in text
    assert f"edgemoe_prompt_cache_bytes {snap['prompt_cache']['bytes']}\n" in text


def test_config_key_and_zero_turns_it_off():
    assert load_config(None).server.prompt_cache_mb == 256
    for bad in (-1, "lots", 1.5, True):
        with pytest.raises(ConfigError, match=r"server\.prompt_cache_mb: expected MB as an integer >= 0"):
            load_config(None, {"server.prompt_cache_mb": bad})
    from edgemoe.engine.session import Session

    args = argparse.Namespace()
    s = Session(args, load_config(None, {"server.prompt_cache_mb": 0}), progress=False)
    try:
        assert s.core().prefix_cache is None
        assert s.core(prompt_cache=False).prefix_cache is None
    finally:
        s.close()
    s = Session(args, load_config(None, {"server.prompt_cache_mb": 2}), progress=False)
    try:
        assert s.core().prefix_cache.budget_bytes == 2 * MB
    finally:
        s.close()


# ---------------------------------------------------------------- through `edgemoe serve`

def served(sock: str, bodies: list[dict], together: bool) -> list[dict]:
    """POST each completion body (at once on threads when `together`); the replies' choices, in order."""
    out: list[dict | None] = [None] * len(bodies)

    def ask(i: int) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=300) as c:
            r = c.post("/v1/completions", json=bodies[i])
        assert r.status_code == 200, r.text
        out[i] = r.json()["choices"][0]

    if together:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(bodies)):
            ask(i)
    return out


def test_served_concurrent_clients_equal_a_server_without_reuse(tmp_path):
    """The streamed default model served with and without the prompt cache: 6 clients at once (3 run, 3 wait),
    prompts sharing a system prefix, greedy and seeded, then the same again one by one, then each
    conversation's next turn; every reply (tokens and log-probabilities) is the same, and the metrics say reuse
    happened."""
    rng = np.random.default_rng(10)
    system = words(rng, 3, 500, 50)
    prompts = [system + words(rng, 500 + 200 * i, 700 + 200 * i, 4 + i) for i in range(6)]

    def body(i: int, prompt: list[int]) -> dict:
        return {"prompt": prompt, "max_tokens": 12, "logprobs": 1, "temperature": 0 if i % 2 else 1.0,
                "seed": 100 + i}

    results, health, metrics = {}, {}, {}
    for mb in (0, 64):
        sock = str(tmp_path / f"{mb}.sock")
        proc = start(["-m", default_model_path(), "--socket", sock, "--cache-mb", str(STREAM_MB),
                      "--set", "batching.max_batch=3", "--set", f"batching.prefill_chunk={CHUNK}",
                      "--set", f"server.prompt_cache_mb={mb}"], sock, sock + ".log")
        try:
            first = served(sock, [body(i, p) for i, p in enumerate(prompts)], together=True)
            again = served(sock, [body(i, p) for i, p in enumerate(prompts)], together=False)
            turns = [p + c["token_ids"] + [7, 8, 9] for p, c in zip(prompts, first)]
            nxt = served(sock, [body(i, p) for i, p in enumerate(turns)], together=True)
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe") as c:
                health[mb] = c.get("/health").json()
                metrics[mb] = c.get("/metrics").text
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        results[mb] = [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in first + again + nxt]
    assert results[64] == results[0]
    total = 2 * sum(len(p) for p in prompts) + sum(len(p) for p in turns)
    assert health[0]["prompt_tokens_reused"] == 0 and "prompt_cache" not in health[0]
    assert health[0]["prompt_tokens"] == total
    h = health[64]
    assert h["prompt_tokens"] + h["prompt_tokens_reused"] == total  # every prompt token either ran or was reused
    assert h["prompt_tokens_reused"] >= sum(len(p) - 1 for p in prompts) + sum(len(p) - 4 for p in turns)
    assert 0 < h["prompt_cache"]["bytes"] <= 64 * MB and h["prompt_cache"]["entries"] >= 6
    assert f"edgemoe_prompt_tokens_reused_total {h['prompt_tokens_reused']}\n" in metrics[64]
    assert "edgemoe_prompt_tokens_reused_total 0\n" in metrics[0]
    assert json.dumps(h["prompt_cache"])  # plain numbers
