"""The thread governor (engine/threads.py): it settles on the count whose passes are fastest, moves when the box
changes (a busy core makes two threads slow), and the tokens do not depend on its choices."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from edgemoe.default_model import default_model_path
from edgemoe.engine.core import EngineCore, run_to_end
from edgemoe.engine.request import Request
from edgemoe.engine.threads import MAX_INTERVAL, MIN_WINDOW, Load, ThreadGovernor, candidates, describe
from edgemoe.loader import load_model
from edgemoe.sampling import SamplingParams


class Free:
    """A Load stand-in: the cores other processes leave free."""

    def __init__(self, n):
        self.n = n

    def free_cores(self):
        return self.n


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
    gov = ThreadGovernor(2, Free(2))
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


def test_a_busy_box_seen_in_proc_stat_is_not_tried():
    """Other processes using a core: only one thread runs, with no trial on two; free again: two."""
    free = Free(1)
    gov = ThreadGovernor(2, free)
    chosen = drive(gov, lambda n, i: {1: 1e-3, 2: 0.6e-3}[n], 300)
    assert set(chosen) == {1}
    free.n = 2
    chosen = drive(gov, lambda n, i: {1: 1e-3, 2: 0.6e-3}[n], 300)
    assert chosen[-100:].count(2) == 100
    assert set(drive(ThreadGovernor(2, Free(None)), lambda n, i: 1e-3, 50)) == {1}  # nothing known yet: one thread


def test_load_reads_other_processes_time(tmp_path, monkeypatch):
    """Load: busy jiffies of every CPU (not idle, not iowait) less this process's own time, per second."""
    import edgemoe.engine.threads as threads_module

    stat = tmp_path / "stat"
    tick = __import__("os").sysconf("SC_CLK_TCK")

    def write(busy, idle):  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 ...\n")

    clock = [100.0]
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: clock[0])
    own = [1.0]
    monkeypatch.setattr(threads_module.os, "times", lambda: type("T", (), {"user": own[0], "system": 0.0})())
    write(1000, 5000)
    load = Load(2, str(stat))
    assert load.free_cores() is None  # no window yet
    clock[0] += 1.0
    write(1000 + int(1.3 * tick), 5000 + int(0.7 * tick))  # 1.3 CPU-seconds busy in 1 s, 0.2 of them ours
    own[0] += 0.2
    assert load.free_cores() == 1 and abs(load.others - 1.1) < 0.02
    clock[0] += 1.0
    write(1000 + int(1.5 * tick), 5000 + int(2.2 * tick))  # 0.2 busy in 1 s, all ours
    own[0] += 0.2
    assert load.free_cores() == 2
    clock[0] += 5.0  # a pause of ours (a server between requests) while another process took both cores:
    write(1000 + int(11.5 * tick), 5000 + int(2.2 * tick))  # not taken as the load now
    assert load.free_cores() == 2
    clock[0] += 0.1
    write(1000 + int(11.7 * tick), 5000 + int(2.2 * tick))  # the next window says it: both cores busy
    assert load.free_cores() == 1
    clock[0] += MIN_WINDOW / 2  # within a window: the last figure, no read
    stat.unlink()
    assert load.free_cores() == 1
    assert Load(2, str(tmp_path / "missing")).free_cores() == 2  # no /proc/stat: every core


def test_sizes_are_decided_apart():
    gov = ThreadGovernor(2, Free(2))
    for _ in range(100):  # one-row passes are faster alone, 64-row passes on two threads
        for rows, cost in ((1, {1: 1e-3, 2: 3e-3}), (64, {1: 1e-3, 2: 0.5e-3})):
            n = gov.before(rows)
            gov.after(rows, cost[n] * rows)
    assert gov.status()["choice"] == {"1-1 rows": 1, "64-127 rows": 2}


def test_a_noisy_pass_does_not_flip_the_choice():
    gov = ThreadGovernor(2, Free(2))
    rng = np.random.default_rng(0)
    cost = {1: 1.0e-3, 2: 0.6e-3}
    chosen = drive(gov, lambda n, i: cost[n] * (20 if i % 97 == 50 else 1) * rng.uniform(0.9, 1.1), 2000)
    assert chosen[200:].count(2) / 1800 > 0.95
    assert gov._sizes[1, False].interval <= MAX_INTERVAL


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
        gov = ThreadGovernor(top, Free(top))
        got = run(gov)
    finally:
        numba.set_num_threads(top)
    assert got == want
    if top > 1:
        assert all(n > 5 for n in gov.passes.values()), gov.passes


def test_a_new_size_starts_from_its_neighbours_choice():
    """Once one-row passes are decided (two threads), 8-row passes start on two threads without a trial; their
    first trial comes after FIRST_INTERVAL passes and still finds their own best (here one thread)."""
    from edgemoe.engine.threads import FIRST_INTERVAL

    gov = ThreadGovernor(2, Free(2))
    drive(gov, lambda n, i: {1: 1e-3, 2: 0.6e-3}[n], 50)
    chosen = drive(gov, lambda n, i: {1: 1e-3, 2: 2e-3}[n], 300, rows=8)
    assert chosen[:FIRST_INTERVAL] == [2] * FIRST_INTERVAL
    assert chosen[-100:].count(1) > 95 and gov.status()["choice"] == {"1-1 rows": 2, "8-15 rows": 1}
    fresh = ThreadGovernor(2, Free(2))  # nothing decided yet: the first size starts with a trial
    assert 1 in drive(fresh, lambda n, i: 1e-3, 6, rows=8)


def test_prompt_passes_are_timed_apart():
    """Passes with prompt chunks and decode steps of the same size keep their own choices."""
    gov = ThreadGovernor(2, Free(2))
    for _ in range(100):
        for prompt, cost in ((True, {1: 1e-3, 2: 3e-3}), (False, {1: 1e-3, 2: 0.5e-3})):
            n = gov.before(6, prompt=prompt)
            gov.after(6, cost[n] * 6)
    assert gov.status()["choice"] == {"4-7 rows": 2, "4-7 rows with prompt": 1}
