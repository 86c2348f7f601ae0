"""Speculative verification of one drafted token against the target's logits.

Greedy: the token stands when it is the target's argmax. Temperature > 0: the speculative-sampling rule
(Leviathan et al. 2023, Chen et al. 2023): accept token x with probability min(1, p(x) / q(x)), where p
is the target's and q the draft's distribution after the same sampling chain (a deterministic proposer
has q = one-hot on x); after a rejection the next token is drawn from norm(max(0, p - q)). The accepted
and corrected tokens are then distributed exactly as plain sampling from p.

    p, q: (ids (n,) int64, probs (n,) float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..sampling import Sampler


def prob_of(dist: tuple[np.ndarray, np.ndarray], token: int) -> float:
    ids, probs = dist
    hit = np.flatnonzero(ids == token)
    return float(probs[hit[0]]) if hit.size else 0.0


def residual(p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """norm(max(0, p - q)) over p's candidates (q's other tokens have p = 0 there)."""
    ids, pp = p
    qq = np.zeros_like(pp)  # (n,) q on p's candidates
    qi, qp = q
    where = {int(t): j for j, t in enumerate(ids)}
    for t, v in zip(qi, qp):
        j = where.get(int(t))
        if j is not None:
            qq[j] = v
    r = np.maximum(pp - qq, 0.0)  # (n,)
    total = r.sum()
    if not total > 0:  # p == q: a rejection had probability 0; keep p
        return ids, pp
    return ids, r / total


def verify_token(sampler: Sampler, logits: np.ndarray, history: Sequence[int], token: int,
                 q: tuple[np.ndarray, np.ndarray] | None) -> tuple[bool, tuple[np.ndarray, np.ndarray] | None]:
    """(accepted, residual): whether the drafted `token` stands after `history` given the target's `logits`
    (V,); if not, the distribution the corrected token is drawn from (None: greedy, the argmax of logits).
    q: the draft's distribution for `token`, None for a deterministic proposer."""
    if sampler.params.temperature == 0.0:
        return token == sampler.sample(logits, history), None
    p = sampler.distribution(logits, history)
    px = prob_of(p, token)
    qx = 1.0 if q is None else prob_of(q, token)
    if qx > 0 and sampler.uniform() < min(1.0, px / qx):
        return True, None
    one_hot = (np.array([token], np.int64), np.ones(1))
    return False, residual(p, one_hot if q is None else q)
