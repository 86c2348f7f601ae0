"""Draft proposers for speculative decoding: each proposes up to k tokens to follow a request's history.

- `lookup`: prompt lookup: the longest recent n-gram of the history that occurred before proposes the
  tokens that followed it there (no model at all);
- `draft`: a small model with an identical tokenizer, run on its own KV cache per request;
- `self`: the target model itself, each router restricted to the experts already in RAM (top
  `experts_per_tok` of them, renormalised) and some layers skipped: no disk read while drafting. It writes
  its keys and values into the target's cache beyond the committed positions, where the verification
  pass overwrites them.

A proposer's drafts for all requests of a step are made together: model-based proposers run one batched
pass per drafted position. Each draft token comes with q, the proposer's distribution for it after the
request's sampling chain (None for lookup: a deterministic proposer, q = one-hot).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..models.moe import DraftRouting
from ..sampling import Sampler

LOOKUP_MAX_NGRAM = 4


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    q: list = field(default_factory=list)  # per token: (ids, probs) or None (deterministic)
    proposer: object = None  # who drafted it (set by the engine)


class LookupProposer:
    """Prompt-lookup drafting; a match shorter than `min_match` tokens proposes nothing."""

    name = "lookup"
    rounds = 0  # model passes of the last `propose` (none)

    def __init__(self, min_match: int = 2):
        self.min_match = min_match

    def start(self, req) -> None:
        pass

    def propose(self, reqs: list, ks: list[int]) -> list[Draft]:
        drafts = [lookup(req.history, k, self.min_match) for req, k in zip(reqs, ks)]
        return [Draft(toks, [None] * len(toks)) for toks in drafts]

    def rollback(self, req) -> None:
        pass

    def release(self, req) -> None:
        pass


def lookup(history: list[int], k: int, min_match: int = 2, max_ngram: int = LOOKUP_MAX_NGRAM) -> list[int]:
    """The up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram
    (min_match <= n <= max_ngram) of `history`; [] when none occurs."""
    if k <= 0 or len(history) <= min_match:
        return []
    arr = np.asarray(history, dtype=np.int64)  # (L,)
    L = arr.shape[0]
    for n in range(min(max_ngram, L - 1), min_match - 1, -1):
        windows = sliding_window_view(arr[:L - 1], n)  # (L - n, n): every earlier n-gram with a successor
        hits = np.flatnonzero((windows == arr[L - n:]).all(axis=1))
        if hits.size:
            j = int(hits[-1]) + n  # the most recent occurrence's successor
            return [int(t) for t in arr[j:j + k]]
    return []


class _ModelProposer:
    """Shared by `draft` and `self`: batched rounds of one drafted token per request."""

    name = "model"

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.rounds = 0  # model passes of the last `propose`

    def _prepare(self, reqs: list) -> list:
        """Per request: (cache, its first tokens to feed, draft sampler)."""
        raise NotImplementedError

    def _pass(self, batch: list, skipped: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _divergence(self, logits: np.ndarray, token: int, q, skipped: float) -> float:
        raise NotImplementedError

    def _finish(self, reqs: list, saved: list) -> None:
        pass

    def propose(self, reqs: list, ks: list[int]) -> list[Draft]:
        drafts = [Draft() for _ in reqs]
        self.rounds = 0
        live = [j for j, k in enumerate(ks) if k > 0]
        if not live:
            return drafts
        prepared = self._prepare([reqs[j] for j in live])
        feed = {j: p[1] for j, p in zip(live, prepared)}
        info = dict(zip(live, prepared))
        saved = [p[0].length for p in prepared]
        try:
            while live:
                self.rounds += 1
                skipped = np.zeros(sum(len(feed[j]) for j in live))
                logits = self._pass([(np.asarray(feed[j], np.int64), info[j][0]) for j in live], skipped)  # (n, V)
                if logits is None:  # every branch diverged part-way through the pass
                    break
                ends = np.cumsum([len(feed[j]) for j in live]) - 1
                still = []
                for row, j in enumerate(live):
                    req, (_, _, sampler) = reqs[j], info[j]
                    history = req.history + drafts[j].tokens
                    q = sampler.distribution(logits[row], history)
                    tok = int(sampler.draw(*q)) if sampler.params.temperature > 0 else int(q[0][0])
                    if self._divergence(logits[row], tok, q, float(skipped[ends[row]])) > self.threshold:
                        continue  # the draft is unsure: this request's branch stops here
                    drafts[j].tokens.append(tok)
                    drafts[j].q.append(q if sampler.params.temperature > 0 else None)
                    if len(drafts[j].tokens) < ks[j]:
                        feed[j] = [tok]
                        still.append(j)
                live = still
        finally:
            self._finish([reqs[j] for j in info], saved)
        return drafts


def _confidence(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token]   logits: (V,)"""
    x = logits.astype(np.float64)
    e = np.exp(x - x.max())
    return float(e[token] / e.sum())


class DraftModelProposer(_ModelProposer):
    """A separate small model with the target's tokenizer; one KV cache per request."""

    name = "draft"

    def __init__(self, model, threshold: float):
        super().__init__(threshold)
        self.model = model

    def start(self, req) -> None:
        req.spec.draft_cache = self.model.new_cache(req.cache.n_ctx)
        req.spec.draft_sampler = Sampler(req.params, self.model.args.vocab_size, n_prompt=len(req.prompt_ids))

    def _prepare(self, reqs: list) -> list:
        return [(r.spec.draft_cache, r.history[r.spec.draft_cache.length:], r.spec.draft_sampler) for r in reqs]

    def _pass(self, batch: list, skipped: np.ndarray) -> np.ndarray:
        return self.model.forward_batch(batch)

    def _divergence(self, logits, token, q, skipped) -> float:
        return 1.0 - _confidence(logits, token)

    def rollback(self, req) -> None:
        req.spec.draft_cache.truncate(len(req.history))

    def release(self, req) -> None:
        req.spec.draft_cache = None


class SelfProposer(_ModelProposer):
    """The target model on the experts in RAM (DraftRouting), writing into the target's own caches."""

    name = "self"

    def __init__(self, model, threshold: float, routing: DraftRouting):
        super().__init__(threshold)
        self.model = model
        self.routing = routing

    def start(self, req) -> None:
        req.spec.draft_sampler = Sampler(req.params, self.model.args.vocab_size, n_prompt=len(req.prompt_ids))

    def _prepare(self, reqs: list) -> list:
        return [(r.cache, r.history[r.cache.length:], r.spec.draft_sampler) for r in reqs]

    def _pass(self, batch: list, skipped: np.ndarray) -> np.ndarray:
        return self.model.forward_batch(batch, draft=self.routing, skipped=skipped, stop_above=self.threshold)

    def _divergence(self, logits, token, q, skipped) -> float:
        return skipped

    def _finish(self, reqs: list, saved: list) -> None:
        for r, n in zip(reqs, saved):  # the verification pass rewrites these positions
            r.cache.length = n

    def rollback(self, req) -> None:
        pass

    def release(self, req) -> None:
        pass
