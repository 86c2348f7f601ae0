"""The thread governor (engine/threads.py): it settles on the count whose passes are fastest, moves when the box
changes (a busy core makes two threads slow), and the tokens do not depend on its choices."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from edgemoe.default_model import default_model_path
from edgemoe.engine.core import EngineCore, run_to_end
from edgemoe.engine.request import Request
from edgemoe.engine.threads import MAX_INTERVAL, ThreadGovernor, candidates, describe
from edgemoe.loader import load_model
from edgemoe.sampling import SamplingParams


def drive(gov: ThreadGovernor, cost, passes: int, rows: int = 1) -> list[int]:
    """Run `passes` passes whose seconds per row are cost(count, i); the counts chosen."""
    chosen = []
    for i in range(passes):
        n = gov.before(rows)
        chosen.append(n)
        gov.after(rows, cost(n, i) * rows)
    return chosen


def test_candidates():
    assert candidates(1) == (1,) and candidates(2) == (1, 2) and candidates(8) == (1, 4, 8)


def test_settles_on_the_fastest_and_follows_a_change():
    gov = ThreadGovernor(2)
    quiet = {1: 1.0e-3, 2: 0.6e-3}
    chosen = drive(gov, lambda n, i: quiet[n], 400)
    assert chosen[-300:].count(2) / 300 > 0.97  # trials of one thread are rare once two keep winning
    busy = {1: 1.0e-3, 2: 30e-3}  # the other core taken: every two-thread pass waits a time slice
    chosen = drive(gov, lambda n, i: busy[n], 3000)
    assert chosen.index(1) <= 2  # the first late pass starts a trial
    extra = sum(busy[n] - busy[1] for n in chosen[20:]) / (len(chosen[20:]) * busy[1])
    assert extra < 0.05, extra  # the trials of two threads cost little once one wins by far
    chosen = drive(gov, lambda n, i: quiet[n], 5000)  # quiet again: back to two within the longest interval
    assert chosen[-50:].count(2) == 50
    assert gov.status()["choice"] == {"1-1 rows": 2} and describe(gov.status()).startswith("auto threads (1 or 2")


def test_sizes_are_decided_apart():
    gov = ThreadGovernor(2)
    for _ in range(100):  # one-row passes are faster alone, 64-row passes on two threads
        for rows, cost in ((1, {1: 1e-3, 2: 3e-3}), (64, {1: 1e-3, 2: 0.5e-3})):
            n = gov.before(rows)
            gov.after(rows, cost[n] * rows)
    assert gov.status()["choice"] == {"1-1 rows": 1, "64-127 rows": 2}


def test_a_noisy_pass_does_not_flip_the_choice():
    gov = ThreadGovernor(2)
    rng = np.random.default_rng(0)
    cost = {1: 1.0e-3, 2: 0.6e-3}
    chosen = drive(gov, lambda n, i: cost[n] * (20 if i % 97 == 50 else 1) * rng.uniform(0.9, 1.1), 2000)
    assert chosen[200:].count(2) / 1800 > 0.95
    assert gov._sizes[1].interval <= MAX_INTERVAL


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_path())


def test_tokens_do_not_depend_on_the_counts(model, monkeypatch):
    """Greedy tokens and their logprobs with the governor trying another count at every pass equal one thread's."""
    import edgemoe.engine.threads as threads_module

    prompt = model.tokenizer.encode("ROMEO.\nBut soft, what light")
    top = numba.config.NUMBA_NUM_THREADS

    def run(threads):
        events = []
        core = EngineCore(model.model, model.tokenizer, prefill_chunk=8, threads=threads)
        run_to_end(core, Request(prompt, 40, SamplingParams(temperature=0.0), logprobs=3, emit=events.append))
        return [(e["id"], e["logprob"], e["top"]) for e in events if e["type"] == "token"]

    numba.set_num_threads(1)
    try:
        want = run(None)
        monkeypatch.setattr(threads_module, "FIRST_INTERVAL", 0)  # a trial at every pass: the counts alternate
        monkeypatch.setattr(threads_module, "MAX_INTERVAL", 0)
        gov = ThreadGovernor(top)
        got = run(gov)
    finally:
        numba.set_num_threads(top)
    assert got == want
    if top > 1:
        assert all(n > 5 for n in gov.passes.values()), gov.passes
