"""When speculation pays: which proposer runs (or none), and how many tokens it drafts, step by step.

Two levels, both measured while the engine runs:
- **Arms.** Plain decoding and each proposer are arms; one is active for a window of `WINDOW` decoding
  steps, and the window's tokens per second of wall time (everything included: drafting, the verification
  rows, the expert reads a draft token's routing caused and the cache entries it evicted) is its arm's
  score. The best-scoring arm is kept (a proposer only when it beats plain decoding by `MARGIN`); an arm
  that lost its trial (plain decoding too) is tried again after 2, 4, ... up to `BACKOFF_MAX` windows, so a
  changed context (a repeat starting, the cache warming up) is noticed and a losing proposer costs a small,
  shrinking share of the steps.
- **k.** While a proposer is active, each request drafts the k that maximises expected tokens per second:
  with per-token acceptance a, a pass verifying k drafts yields E(k) = (1 - a^(k+1)) / (1 - a) tokens, at
  the cost of k drafting rounds plus k more rows in the step's pass (pass time by rows, measured; seeded at
  warm-up). Acceptance is tracked per request and proposer (and over all requests, as a new one's prior).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

EMA = 0.2  # weight of a new measurement
WINDOW = 16  # decoding steps an arm stays active before it is scored
BACKOFF_MAX = 32  # windows a losing arm waits at most before its next trial
MARGIN = 0.03  # how much faster than plain decoding a proposer's windows must be for it to stay on
PRIOR_ACCEPT = 0.6  # acceptance assumed before a proposer's first verification
PRIOR_ROUND = {"lookup": 0.0, "draft": 0.5, "self": 1.0}  # a drafting round before it is measured, in 1-row passes
OPTIMISTIC_ACCEPT = 0.9  # an arm is tried only if it would beat plain decoding at this acceptance
K_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens a verification pass of k drafts yields at per-token acceptance a."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class PassCosts:
    """Seconds of a forward pass by the rows it carries: running means, interpolated between sizes."""

    def __init__(self):
        self.t: dict[int, float] = {}
        self.known: list[int] = []  # sorted keys of t

    def record(self, rows: int, seconds: float) -> None:
        old = self.t.get(rows)
        if old is None:
            bisect.insort(self.known, rows)
        self.t[rows] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def __call__(self, rows: int) -> float:
        t, known = self.t, self.known
        if rows in t:
            return t[rows]
        if not known:
            return float(rows)
        if len(known) == 1:
            return t[known[0]] * rows / known[0]
        j = bisect.bisect_left(known, rows)
        if 0 < j < len(known):
            a, b = known[j - 1], known[j]
            return t[a] + (t[b] - t[a]) * (rows - a) / (b - a)
        a, b = (known[-2], known[-1]) if j else (known[0], known[1])  # extrapolate from the nearest two
        slope = max(0.0, (t[b] - t[a]) / (b - a))
        return t[b] + slope * (rows - b) if j else max(1e-9, t[a] - slope * (a - rows))


@dataclass
class SpecState:
    """A request's speculation: acceptance per proposer, and what its proposers keep."""

    accept: dict = field(default_factory=dict)  # proposer name → running acceptance rate
    draft_cache: object = None  # DraftModelProposer
    draft_sampler: object = None  # model-based proposers


def _update(rates: dict, name: str, prior: float, drafted: int, accepted: int) -> None:
    """Running acceptance: each drafted position up to the first rejection is one Bernoulli trial; a branch
    its proposer stopped before any token (unsure) counts as one rejected trial."""
    trials = min(drafted, accepted + 1) if drafted else 1
    old = rates.get(name, prior)
    w = 1 - (1 - EMA) ** trials
    rates[name] = (1 - w) * old + w * (accepted / trials)


class Gate:
    """Chooses the active arm per window and (proposer, k) per request and step."""

    def __init__(self, proposers: list, k_max: int, adaptive: bool = True):
        self.proposers = proposers
        self.k_max = k_max
        self.adaptive = adaptive  # False: always the first proposer with k = k_max (tests)
        self.costs = PassCosts()
        self.draft_round: dict[str, float] = {}  # proposer → seconds per drafting round (running mean)
        self.accept: dict[str, float] = {}  # proposer → acceptance over all requests: a new request's prior
        self.arms = [None] + list(proposers)  # None: plain decoding
        self.score: dict[int, float] = {}  # arm index → tokens/s (running mean over its windows)
        self.wait: dict[int, int] = {}  # arm index → windows it waits before its next trial
        self.due: dict[int, int] = {}  # arm index → window number of its next trial
        self.active = 0 if adaptive else 1
        self.windows = 0
        self._steps = self._tokens = 0
        self._seconds = 0.0

    # ------------------------------------------------------------------ measurements

    def record(self, st: SpecState, name: str, drafted: int, accepted: int) -> None:
        """A verification (or a branch stopped before its first token) of `name`'s drafts for one request."""
        _update(st.accept, name, self.accept.get(name, PRIOR_ACCEPT), drafted, accepted)
        _update(self.accept, name, PRIOR_ACCEPT, drafted, accepted)

    def record_draft(self, name: str, rounds: int, seconds: float) -> None:
        if rounds <= 0:
            return
        per = seconds / rounds
        old = self.draft_round.get(name)
        self.draft_round[name] = per if old is None else (1 - EMA) * old + EMA * per

    def step_done(self, tokens: int, seconds: float) -> None:
        """A decoding step sent `tokens` tokens in `seconds`; every WINDOW such steps the active arm is scored
        and the next one chosen."""
        if not self.adaptive or tokens == 0:
            return
        self._steps += 1
        self._tokens += tokens
        self._seconds += seconds
        if self._steps < WINDOW:
            return
        rate = self._tokens / max(self._seconds, 1e-9)
        old = self.score.get(self.active)
        self.score[self.active] = rate if old is None else 0.5 * old + 0.5 * rate
        self._steps = self._tokens = 0
        self._seconds = 0.0
        self.windows += 1
        self.active = self._next_arm()

    def _next_arm(self) -> int:
        candidates = [0] + [a for a in range(1, len(self.arms)) if self.could_pay(self.arms[a])]
        untried = [a for a in candidates if a not in self.score]
        if untried:
            return untried[0]
        # A proposer must beat plain decoding by MARGIN to be kept: a window's score is noisy, and a proposer
        # that only ties costs its drafting whenever it is wrong.
        best = max(candidates, key=lambda a: self.score[a] / (1.0 if a == 0 else 1.0 + MARGIN))
        if self.active != best:  # the arm just scored lost: it waits twice as long as last time
            self.wait[self.active] = min(BACKOFF_MAX, 2 * self.wait.get(self.active, 1))
            self.due[self.active] = self.windows + self.wait[self.active]
        for a in candidates:
            if a != best and self.windows >= self.due.get(a, 0):
                return a
        return best

    def could_pay(self, proposer) -> bool:
        """Whether `proposer` beats plain decoding of one request at OPTIMISTIC_ACCEPT with the measured costs
        (a draft round that costs a whole pass, as a self-draft in RAM does, never can)."""
        c1, d = self.costs(1), self.round_cost(proposer.name)
        a = max(OPTIMISTIC_ACCEPT, self.accept.get(proposer.name, 0.0))
        return any(expected_tokens(a, k) / max(self.costs(1 + k) + k * d, 1e-9) > 1.0 / max(c1, 1e-9)
                   for k in K_CHOICES if k <= self.k_max)

    # ------------------------------------------------------------------ decisions

    @property
    def active_proposer(self):
        return self.arms[self.active]

    def round_cost(self, name: str) -> float:
        d = self.draft_round.get(name)
        return d if d is not None else PRIOR_ROUND.get(name, 1.0) * self.costs(1)

    def choose(self, st: SpecState, base_rows: int, remaining: int) -> int:
        """k for the active proposer and a request whose step already carries `base_rows` rows (its own token
        included) and that may still emit `remaining` tokens after this step's sampled one; 0: no drafting."""
        proposer = self.active_proposer
        k_cap = min(self.k_max, remaining)
        if proposer is None or k_cap <= 0:
            return 0
        if not self.adaptive:
            return k_cap
        a = st.accept.get(proposer.name, self.accept.get(proposer.name, PRIOR_ACCEPT))
        before = self.costs(base_rows - 1) if base_rows > 1 else 0.0
        d = self.round_cost(proposer.name)
        best_k, best_rate = 1, 0.0  # an active proposer drafts at least one token: its arm is being measured
        for k in K_CHOICES:
            if k > k_cap:
                break
            rate = expected_tokens(a, k) / max(self.costs(base_rows + k) - before + k * d, 1e-9)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
