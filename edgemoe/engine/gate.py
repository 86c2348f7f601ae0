"""When speculation pays: choose the proposer and the number of draft tokens k for each request and step.

With a per-token acceptance rate a, a pass verifying k drafted tokens yields on average
E(k) = (1 - a^(k+1)) / (1 - a) tokens (the accepted run plus the target's own next token). It costs the
drafting (k rounds of the proposer) plus the extra rows in the step's forward pass. Both are measured
while the engine runs: pass time by the number of rows it carries (seeded at warm-up), drafting time per
round per proposer, and acceptance per request and proposer. The gate picks the (proposer, k) with the most
tokens per second, k = 0 (plain decoding) when nothing beats it. Every `EXPLORE_EVERY` steps a request
tries k = 1 with a proposer it has stopped using, so a changed context (a repeat starting, the cache
warming up) is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EMA = 0.2  # weight of a new measurement
EXPLORE_EVERY = 16
PRIOR_ACCEPT = {"lookup": 0.6, "draft": 0.6, "self": 0.6}


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens a verification pass of k drafts yields at per-token acceptance a."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class PassCosts:
    """Seconds of a forward pass by the rows it carries: running means, interpolated between sizes."""

    def __init__(self):
        self.t: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        old = self.t.get(rows)
        self.t[rows] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def __call__(self, rows: int) -> float:
        if rows in self.t:
            return self.t[rows]
        known = sorted(self.t)
        if not known:
            return float(rows)
        lo = [r for r in known if r < rows]
        hi = [r for r in known if r > rows]
        if lo and hi:
            a, b = lo[-1], hi[0]
            return self.t[a] + (self.t[b] - self.t[a]) * (rows - a) / (b - a)
        if len(known) == 1:
            return self.t[known[0]] * rows / known[0]
        a, b = (known[-2], known[-1]) if lo else (known[0], known[1])  # extrapolate from the nearest two
        slope = max(0.0, (self.t[b] - self.t[a]) / (b - a))
        return self.t[b] + slope * (rows - b) if lo else max(1e-9, self.t[a] - slope * (a - rows))


@dataclass
class SpecState:
    """A request's speculation: acceptance per proposer, and what its proposers keep."""

    accept: dict = field(default_factory=dict)  # proposer name → running acceptance rate
    steps: int = 0
    last_used: dict = field(default_factory=dict)  # proposer name → step it last drafted
    draft_cache: object = None  # DraftModelProposer
    draft_sampler: object = None  # model-based proposers

    def record(self, name: str, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        # Each drafted position until the first rejection is one Bernoulli trial of acceptance.
        trials = min(drafted, accepted + 1)
        rate = accepted / trials
        old = self.accept.get(name, PRIOR_ACCEPT.get(name, 0.5))
        w = 1 - (1 - EMA) ** trials
        self.accept[name] = (1 - w) * old + w * rate


class Gate:
    """Chooses (proposer, k) per request and step from measured costs and acceptance."""

    def __init__(self, proposers: list, k_max: int, adaptive: bool = True):
        self.proposers = proposers
        self.k_max = k_max
        self.adaptive = adaptive
        self.costs = PassCosts()
        self.draft_round: dict[str, float] = {}  # proposer → seconds per drafting round (running mean)

    def record_draft(self, name: str, rounds: int, seconds: float) -> None:
        if rounds <= 0:
            return
        per = seconds / rounds
        old = self.draft_round.get(name)
        self.draft_round[name] = per if old is None else (1 - EMA) * old + EMA * per

    def choose(self, st: SpecState, base_rows: int, remaining: int):
        """(proposer, k) for a request whose step already carries `base_rows` rows (its own token included)
        and that may still emit `remaining` tokens after this step's sampled one; k = 0: no drafting."""
        st.steps += 1
        k_cap = min(self.k_max, remaining)
        if k_cap <= 0 or not self.proposers:
            return None, 0
        if not self.adaptive:
            return self.proposers[0], k_cap
        c0 = self.costs(base_rows) - self.costs(base_rows - 1) if base_rows > 1 else self.costs(1)
        best, best_k, best_rate = None, 0, 1.0 / max(c0, 1e-9)
        for p in self.proposers:
            a = st.accept.get(p.name, PRIOR_ACCEPT.get(p.name, 0.5))
            d = self.draft_round.get(p.name, 0.0)
            for k in range(1, k_cap + 1):
                extra = self.costs(base_rows + k) - self.costs(base_rows - 1) if base_rows > 1 else \
                    self.costs(1 + k)
                rate = expected_tokens(a, k) / max(extra + k * d, 1e-9)
                if rate > best_rate:
                    best, best_k, best_rate = p, k, rate
        if best is None:
            stale = [p for p in self.proposers if st.steps - st.last_used.get(p.name, 0) >= EXPLORE_EVERY]
            if stale:
                best, best_k = stale[0], 1
        if best is not None:
            st.last_used[best.name] = st.steps
        return best, best_k
