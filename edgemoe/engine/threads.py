"""How many threads each forward pass runs on, chosen from the passes' measured times.

A parallel region ends when its slowest thread does. On a box whose other cores are busy (an appliance's HTTP
side, logging, any other process) the OS deschedules one of our threads for a whole time slice, and a pass of
a few hundred microseconds then takes milliseconds: two threads decode 10-100x slower than one. On a quiet box
two threads are the faster. Which is true changes while a service runs, so the ThreadGovernor measures it:
each pass runs on the thread count that was fastest for passes of its size (seconds per row, the mean of its
last trial passes: a count whose passes are sometimes late pays for them), and now and then a trial runs a few
passes on every count again. A size seen for the first time starts from the choice of the nearest size decided
so far (its first trial comes later), else with a trial; passes carrying prompt chunks are timed apart from
decode steps. A pass far slower than its count's median is a sign that the box changed, and brings the next
trial forward. The kernels give every row the same bits on any thread count (tests/test_fused.py,
tests/test_batch.py), so the choice changes speed only.

A trial on a busy box is itself costly (one pass on all cores can wait a whole scheduler slice), so before each
trial the governor looks at how much CPU other processes used since the last one (/proc/stat less this
process's own time, over at least MIN_WINDOW s) and tries only the counts the idle cores can hold; until a first
window has passed it runs one thread.

    governor = ThreadGovernor(max_threads=2)
    n = governor.before(rows)          # sets Numba's count on the calling thread
    ... the pass ...
    governor.after(rows, seconds)
"""

from __future__ import annotations

import os
import time
from collections import deque
from statistics import median

SAMPLES = 5  # passes per thread count and pass size kept (their median is what "late" is measured against)
TRIAL_PASSES = 3  # passes each count gets in a trial; the mean of its latest ones decides
FIRST_INTERVAL, MAX_INTERVAL = 16, 4096  # passes between trials: doubled while the choice holds, up to MAX
LATE = 3.0  # a pass this many times its count's median brings the next trial forward
BEHIND = 1.5  # a trial pass this many times the fastest count's mean ends its count's part of the trial
TRIAL_SHARE = 0.02  # trials may cost this share of the time: a count 30x slower is tried every ~1,500 passes
MIN_WINDOW = 0.05  # seconds of wall time over which other processes' CPU use is measured (/proc/stat: 10 ms ticks)
STALE_WINDOW = 1.0  # a window this long spans a pause of ours (no passes): it tells of the past, not of now
FREE = 0.5  # a core counts as taken when other processes used more than this share of it


class Load:
    """Cores' worth of CPU time other processes used, from /proc/stat (all CPUs' busy time) less this
    process's own (os.times), over windows of at least MIN_WINDOW s. None: no window has passed yet.

    A window longer than STALE_WINDOW spans a pause in our passes (a server between requests), when other
    processes may have had the cores to themselves; it starts the next window and keeps the figure from before
    the pause (it is taken only when there is none), so a burst of work while we waited does not hold the
    first passes after it to one thread."""

    def __init__(self, cores: int, stat_path: str = "/proc/stat"):
        self.cores = cores
        self.stat_path = stat_path
        self.others: float | None = None
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open(self.stat_path, "rb") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None  # not Linux, or hidden: every count may be tried
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def free_cores(self) -> int | None:
        """Cores other processes leave free (at least 1), None before the first window; every core when
        /proc/stat cannot be read."""
        if self._last is None:
            return self.cores
        if time.monotonic() - self._last[0] >= MIN_WINDOW:  # the files are read once per window, not per pass
            now = self._sample()
            if now is None:
                return self.cores
            dt = now[0] - self._last[0]
            if dt <= STALE_WINDOW or self.others is None:
                self.others = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / dt)
            self._last = now
        if self.others is None:
            return None
        taken = int(self.others + (1 - FREE))  # a core counts as taken from FREE of its time on
        return max(1, self.cores - taken)


def candidates(max_threads: int) -> tuple[int, ...]:
    """The counts worth comparing: one thread, half the cores, all of them."""
    return tuple(sorted({1, max(1, max_threads // 2), max_threads}))


class _Size:
    """The record of one pass size (rows rounded to a power of two)."""

    def __init__(self, counts: tuple[int, ...]):
        self.samples = {c: deque(maxlen=SAMPLES) for c in counts}  # seconds per row
        self.best = counts[-1]
        # counts still to run in the current trial, one entry per pass, the counts taking turns; the first trial
        # starts at once, all cores first (the usual winner on a quiet box; on a busy one a pass that falls
        # BEHIND ends that count's part)
        self.trial: list[int] = [c for _ in range(TRIAL_PASSES) for c in reversed(counts)] if len(counts) > 1 else []
        self.since = 0  # passes since the last trial
        self.interval = FIRST_INTERVAL
        self.cap = counts[-1]  # the most threads the free cores allowed at the last pass

    @property
    def decided(self) -> bool:
        """A trial has ended and none is under way."""
        return not self.trial and any(self.samples.values())

    def seed(self, near: _Size | None) -> None:
        """Start from the choice of a decided nearby size instead of a trial at once: passes of a new size
        (a batch that grew by a row, a prompt chunk) run on that count, and its first trial comes after
        FIRST_INTERVAL passes. On a fresh service each size's first trial used to cost the most."""
        if near is not None and len(self.samples) > 1:
            self.best, self.trial, self.since = near.best, [], 0

    def choose(self, free: int | None) -> int:
        """The count for the next pass; `free`: the cores other processes leave (None: not known yet)."""
        cap = 1 if free is None else free
        if cap > self.cap:  # cores came free: try them at once
            self.since = self.interval
        self.cap = cap
        if self.trial:
            self.trial = [c for c in self.trial if c <= cap]
            if not self.trial:
                self._decide()
        if self.trial:
            return self.trial[0]
        if self.best > cap:
            return max(c for c in self.samples if c <= cap)
        if self.since >= self.interval:  # every count afresh, taking turns, the current choice last
            order = [c for c in self.samples if c != self.best and c <= cap] + [self.best]
            self.trial = [c for _ in range(TRIAL_PASSES) for c in order]
            return self.trial[0]
        return self.best

    def record(self, count: int, per_row: float) -> None:
        s = self.samples[count]
        late = len(s) == SAMPLES and per_row > LATE * median(s)
        s.append(per_row)
        if self.trial and self.trial[0] == count:
            self.trial.pop(0)
            fastest = min(self._mean(c) for c in self.samples)
            if per_row > BEHIND * fastest:  # one pass says enough: its count's other trial passes are skipped
                self.trial = [c for c in self.trial if c != count]
            if not self.trial:
                self._decide()
            return
        self.since += 1
        if late:
            self.since = self.interval  # a trial at the next pass

    def _mean(self, count: int) -> float:
        recent = list(self.samples[count])[-TRIAL_PASSES:]
        return sum(recent) / len(recent) if recent else float("inf")

    def _decide(self) -> None:
        ready = {c: self._mean(c) for c, s in self.samples.items() if s}
        if not ready:
            self.since = 0
            return
        best = min(ready, key=lambda c: (ready[c], c))
        interval = min(2 * self.interval, MAX_INTERVAL) if best == self.best else FIRST_INTERVAL
        # the next trial's extra time over `best`'s, in passes of `best`: keep it within TRIAL_SHARE
        extra = sum(TRIAL_PASSES * max(0.0, ready[c] / ready[best] - 1) for c in ready if c != best)
        self.interval = max(interval, min(MAX_INTERVAL, int(extra / TRIAL_SHARE)))
        self.best = best
        self.since = 0


class ThreadGovernor:
    """Chooses Numba's thread count for each pass run on the calling thread (see the module's docstring)."""

    def __init__(self, max_threads: int, load: Load | None = None):
        self.counts = candidates(max_threads)
        self.load = load if load is not None else Load(max_threads)
        self._sizes: dict[int, _Size] = {}
        self._current: tuple[tuple[int, bool], int] | None = None  # (size key, count) of the pass under way
        self.passes = {c: 0 for c in self.counts}  # passes run per count
        self._last: int | None = None

    def before(self, rows: int, prompt: bool = False) -> int:
        """The count for a pass of `rows` rows; sets it on the calling thread. prompt: the pass carries prompt
        chunks (one sequence's rows share its attention, so such passes are timed apart from decode steps)."""
        import numba

        key = (max(rows, 1).bit_length(), bool(prompt))
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = _Size(self.counts)
            size.seed(self._nearest_decided(key))
        n = size.choose(self.load.free_cores())
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        self._current = (key, n)
        self._last = n
        return n

    def _nearest_decided(self, key: tuple[int, bool]) -> _Size | None:
        """The decided record of the size nearest to `key`, of the same kind first (the smaller on a tie)."""
        done = [k for k, s in self._sizes.items() if k != key and s.decided]
        near = min(done, key=lambda k: (k[1] != key[1], abs(k[0] - key[0]), k[0]), default=None)
        return None if near is None else self._sizes[near]

    def after(self, rows: int, seconds: float) -> None:
        if self._current is None:
            return
        key, n = self._current
        self._current = None
        self.passes[n] += 1
        self._sizes[key].record(n, seconds / max(rows, 1))

    @property
    def last(self) -> int | None:
        """The count of the latest pass."""
        return self._last

    def status(self) -> dict:
        """The counts it chooses among, the passes each ran, and the current choice per pass size."""
        return {"mode": "auto", "counts": list(self.counts), "passes": {str(c): n for c, n in self.passes.items()},
                "choice": {f"{1 << (k - 1)}-{(1 << k) - 1} rows{' with prompt' if p else ''}": s.best
                           for (k, p), s in sorted(self._sizes.items())}}


def describe(figures: int | dict) -> str:
    """Session.thread_figures as words: "2 threads", or "auto threads (1 or 2; 1-token passes on 2)"."""
    if isinstance(figures, int):
        return f"{figures} thread{'s' if figures != 1 else ''}"
    counts = " or ".join(str(c) for c in figures.get("counts", []))
    choice = figures.get("choice", {})
    now = "; ".join(f"{size} passes on {n}" for size, n in choice.items())
    return f"auto threads ({counts}{'; ' + now if now else ''})"
