"""Scheduler, stop strings, request validation and the engine loop, without a real model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgemoe.engine.core import EngineCore
from edgemoe.engine.request import Request as Job
from edgemoe.engine.stops import StopMatcher
from edgemoe.sampling import SamplingParams
from edgemoe.server.engine import Engine
from edgemoe.server.metrics import Metrics
from edgemoe.server.scheduler import QueueFull, Scheduler, ShuttingDown, UnknownClass
from edgemoe.server.schemas import RequestError, chat_prompt, parse_request


class Req:
    def __init__(self, name: str, priority: str | None = None):
        self.name, self.priority, self.cancelled = name, priority, False

    def __repr__(self) -> str:
        return self.name


def admission_order(weights: dict, per_class: int) -> list[str]:
    """Classes in the order a batch of one admits them when every class always has someone waiting."""
    s = Scheduler(weights, max_batch=1, max_queue=100)
    for c in weights:
        for i in range(per_class):
            s.submit(Req(f"{c}{i}", c))
    order = []
    while s.has_work:
        (r,) = s.schedule().admitted
        order.append(r.priority)
        s.finish(r)
    return order


def test_weighted_round_robin_is_nginx_smooth_wrr():
    # nginx's documented sequence for weights {a: 5, b: 1, c: 1} ("Upstream: smooth weighted round-robin balancing", 2012).
    assert admission_order({"a": 5, "b": 1, "c": 1}, 5)[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    # Long-run shares follow the weights; an emptied class leaves the rest to the others.
    order = admission_order({"interactive": 3, "batch": 1}, 30)
    assert order[:40].count("interactive") == 30 and order[:40].count("batch") == 10
    assert order[40:] == ["batch"] * 20


def test_batch_limit_fifo_and_join_leave_each_step():
    s = Scheduler({"default": 1}, max_batch=2, max_queue=10)
    reqs = [Req(f"r{i}") for i in range(5)]
    for r in reqs:
        s.submit(r)
    p = s.schedule()
    assert p.admitted == reqs[:2] and p.running == reqs[:2]
    assert s.schedule().admitted == []  # the batch is full
    s.finish(reqs[0])
    p = s.schedule()
    assert p.admitted == [reqs[2]] and p.running == [reqs[1], reqs[2]]


def test_queue_bound_counts_free_slots_and_classes_are_checked():
    s = Scheduler({"interactive": 3, "batch": 1}, max_batch=2, max_queue=1)
    a, b, c = Req("a"), Req("b"), Req("c")
    for r in (a, b, c):  # two take the free slots at the next step, one waits
        s.submit(r)
    assert a.priority == "interactive"  # no class named: the heaviest one
    with pytest.raises(QueueFull):
        s.submit(Req("d"))
    with pytest.raises(UnknownClass, match="vip"):
        s.submit(Req("e", "vip"))
    s.schedule()
    assert s.n_waiting == 1
    with pytest.raises(QueueFull):
        s.submit(Req("f"))


def test_cancelled_requests_leave_at_the_next_step():
    s = Scheduler({"default": 1}, max_batch=1, max_queue=10)
    a, b, c = Req("a"), Req("b"), Req("c")
    for r in (a, b, c):
        s.submit(r)
    s.schedule()
    a.cancelled = b.cancelled = True
    p = s.schedule()
    assert set(map(repr, p.dropped)) == {"a", "b"} and p.admitted == [c] and p.running == [c]


def test_drain_refuses_new_work():
    s = Scheduler({"default": 1}, max_batch=1, max_queue=10)
    a, b = Req("a"), Req("b")
    s.submit(a)
    s.submit(b)
    s.schedule()
    assert s.drain() == [b]
    with pytest.raises(ShuttingDown):
        s.submit(Req("c"))
    assert s.schedule().running == [a]


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["\n\n", "END"])
    assert m.push("hello E") == "hello "  # "E" may start "END"
    assert m.push("x") == "Ex"
    assert m.push(" wor\n") == " wor"
    assert m.push("\nmore") == "" and m.stopped
    assert m.flush() == ""
    m = StopMatcher(["END"])
    assert m.push("EN") == "" and m.flush() == "EN"  # the stream ended without a match


def test_negative_seeds_as_clients_send_them():
    assert parse_request({"prompt": "x", "seed": -1}, False).seed is None  # llama.cpp's "fresh seed"
    assert parse_request({"prompt": "x", "seed": -2}, False).seed == 2**64 - 2  # an int64 read as 64 bits
    assert parse_request({"prompt": "x", "seed": 5}, False).seed == 5


@pytest.mark.parametrize("body, chat, param", [
    ({"prompt": "x", "max_tokens": 0}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, False, "max_tokens"),
    ({"prompt": "x", "top_k": 1.5}, False, "top_k"),
    ({"prompt": "x", "min_p": 1}, False, "min_p"),
    ({"prompt": "x", "seed": -(2**63) - 1}, False, "seed"),
    ({"prompt": "x", "seed": 2**64}, False, "seed"),
    ({"prompt": "x", "logprobs": 99}, False, "logprobs"),
    ({"prompt": "x", "n": 0}, False, "n"),
    ({"prompt": ""}, False, "prompt"),
    ({"prompt": "x", "suffix": "y"}, False, "suffix"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, True,
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, True, "top_logprobs"),
    ([1, 2], False, None),
])
def test_bad_fields_are_named(body, chat, param):
    with pytest.raises(RequestError) as e:
        parse_request(body, chat)
    assert e.value.param == param


def test_good_request_and_chat_template():
    r = parse_request({"prompt": [1, 2], "stop": "\n", "temperature": 0, "logprobs": 0}, chat=False)
    assert r.prompt == [1, 2] and r.stop == ["\n"] and r.temperature == 0 and r.logprobs == 1
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert parse_request({"messages": msgs, "logprobs": True, "top_logprobs": 3}, chat=True).logprobs == 3
    assert chat_prompt(msgs) == "system: be brief\nuser: hi\nassistant:"


class CountingModel:
    """Stands in for Model: after token t the most likely next token is t + 1 (mod V)."""

    class args:
        vocab_size = 16

    class Cache:
        def __init__(self, n_ctx):
            self.n_ctx, self.length = n_ctx, 0

        def truncate(self, length):
            self.length = min(self.length, length)

    def new_cache(self, n_ctx):
        return self.Cache(n_ctx)

    def forward(self, ids, cache, rows=1):
        assert cache.length + len(ids) <= cache.n_ctx
        cache.length += len(ids)
        logits = np.zeros((rows, self.args.vocab_size), np.float32)  # (rows, V)
        for j, t in enumerate(ids[len(ids) - rows:]):
            logits[j, (int(t) + 1) % self.args.vocab_size] = 5.0
        return logits

    def forward_batch(self, batch, rows=None):
        rows = rows or [1] * len(batch)
        return np.concatenate([self.forward(ids, cache, r) for (ids, cache), r in zip(batch, rows)])  # (R, V)


def run_jobs(jobs: list[Job], eos: set[int] = frozenset()) -> None:
    engine = Engine(EngineCore(CountingModel(), None, metrics=Metrics()),
                    Scheduler({"default": 1}, max_batch=2, max_queue=10))
    engine.core.eos_ids = set(eos)  # no tokenizer: ids only, no text
    done = threading.Semaphore(0)
    for job in jobs:
        inner = job.emit
        job.emit = lambda ev, inner=inner: (inner(ev), ev["type"] != "token" and done.release())
        engine.submit(job)
    engine.start()
    for _ in jobs:
        assert done.acquire(timeout=30)
    engine.shutdown(0)
    assert engine.join(30)


def test_engine_steps_every_job_until_length_or_eos():
    greedy = SamplingParams(temperature=0)
    events: dict[int, list] = {0: [], 1: [], 2: []}
    jobs = [Job([3], 4, greedy, emit=events[0].append), Job([7, 8], 3, greedy, emit=events[1].append),
            Job([12], 6, greedy, emit=events[2].append)]
    run_jobs(jobs, eos={15})
    assert [e["id"] for e in events[0][:-1]] == [4, 5, 6, 7] and events[0][-1]["finish_reason"] == "length"
    assert [e["id"] for e in events[1][:-1]] == [9, 10, 11]
    # The third job waited for a free slot (max_batch 2), then stopped at the end-of-sequence token.
    assert [e["id"] for e in events[2][:-1]] == [13, 14, 15] and events[2][-1]["finish_reason"] == "stop"
    assert events[2][-1]["completion_tokens"] == 3


class FailingModel(CountingModel):
    def forward(self, ids, cache, rows=1):
        if int(ids[-1]) == 9:
            raise RuntimeError("expert read failed")
        return super().forward(ids, cache, rows)


def test_a_failing_request_ends_alone():
    greedy = SamplingParams(temperature=0)
    bad, good = [], []
    engine = Engine(EngineCore(FailingModel(), None, metrics=Metrics()),
                    Scheduler({"default": 1}, max_batch=2, max_queue=10))
    done = threading.Semaphore(0)

    def collect(into):
        return lambda ev: (into.append(ev), ev["type"] != "token" and done.release())

    engine.submit(Job([7], 5, greedy, emit=collect(bad)))  # 8, then forward(9) raises
    engine.submit(Job([1], 3, greedy, emit=collect(good)))
    engine.start()
    assert done.acquire(timeout=30) and done.acquire(timeout=30)
    assert bad[-1]["type"] == "error" and "expert read failed" in bad[-1]["message"]
    assert [e["id"] for e in good[:-1]] == [2, 3, 4] and good[-1]["finish_reason"] == "length"
    assert engine.metrics.snapshot()["requests"]["error"] == 1
    engine.shutdown(0)
    assert engine.join(30)
    with pytest.raises(ShuttingDown):
        engine.submit(Job([1], 1, greedy))
