"""Token sampling from a logits vector, with llama.cpp's sampler-chain semantics.

The chain (llama.cpp `common/sampling.cpp` default order, minus DRY/typical/XTC/top-n-sigma):

    logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> dist

- logit bias: `logit_bias` (token id, bias) pairs added to those logits (OpenAI's `logit_bias`).
- penalties: each distinct token among the last `repeat_last_n` of `history` has its logit divided
  by `repeat_penalty` when positive, multiplied when <= 0 (CTRL, with llama.cpp's sign fix); then
  OpenAI's presence and frequency penalties over the generated tokens only (`history[n_prompt:]`):
  logit[j] -= presence_penalty * (c[j] > 0) + frequency_penalty * c[j], c[j] = j's count there.
- top-k: keep the k highest logits (0 = off).
- top-p: softmax over the survivors; keep the shortest prefix (by logit, descending) whose mass
  is >= top_p (1 = off).
- min-p: keep tokens with p >= min_p * p_max, i.e. logit >= max_logit + log(min_p) (0 = off).
- temperature: divide the survivors' logits by `temperature`; the filters above all run at
  temperature 1, as in llama.cpp.
- dist: draw from the softmax of the survivors with a seeded PCG64 generator.

`temperature == 0` is greedy: the argmax of the (biased, penalised) logits, lowest token id on ties.
llama.cpp also applies penalties before its temp<=0 "keep the max" step, so with the default
repeat_penalty=1 greedy is exactly the argmax of the model's raw logits.

Shapes: V = vocabulary size, n = candidates still in the running.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import UsageError

# top-p on an unsorted full vocabulary (top-k off) first sorts only this many best tokens, as
# llama.cpp does; at V=152k the partition costs ~0.3 ms, a full in-place sort ~1.4 ms more.
_TOP_P_PROBE = 256
_TOP_P_FULL_SORT_BELOW = 1024
MAX_PENALTY = 2.0  # OpenAI's bound on presence_penalty and frequency_penalty
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings; names and defaults follow llama.cpp's CLI (`--temp 0.8 --top-k 40 ...`)."""

    temperature: float = 0.8  # 0 = greedy; applied after the filters
    top_k: int = 40  # keep the k most likely tokens; 0 = off
    top_p: float = 0.95  # nucleus mass to keep, in (0, 1]; 1 = off
    min_p: float = 0.05  # keep p >= min_p * p_max, in [0, 1); 0 = off
    repeat_penalty: float = 1.0  # > 0; 1 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at; 0 = off, -1 = all
    seed: int | None = None  # None = a fresh random seed at every reset
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far; 0 = off
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among the generated tokens; 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), each id at most once

    def validate(self) -> SamplingParams:
        """Raise UsageError naming the flag for an impossible value; return self when valid."""
        # `not (x >= lo)` rather than `x < lo` so NaN is rejected too.
        if not (self.temperature >= 0.0) or math.isinf(self.temperature):
            raise UsageError(
                f"--temp must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UsageError(f"--top-k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise UsageError(f"--min-p must be in [0, 1), got {self.min_p}")
        if not (self.repeat_penalty > 0.0) or math.isinf(self.repeat_penalty):
            raise UsageError(
                f"--repeat-penalty must be a finite number > 0 (1 = off), got {self.repeat_penalty}"
            )
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < -1:
            raise UsageError(
                f"--repeat-last-n must be an integer >= -1 (0 = off, -1 = whole history), "
                f"got {self.repeat_last_n}"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise UsageError(f"--seed must be an integer >= 0, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-MAX_PENALTY <= v <= MAX_PENALTY):
                raise UsageError(f"{name} must be a number from {-MAX_PENALTY:g} to {MAX_PENALTY:g} (0 = off), got {v}")
        ids = [t for t, _ in self.logit_bias]
        if len(set(ids)) != len(ids) or not all(_is_int(t) and t >= 0 for t in ids):
            raise UsageError(f"logit_bias must name distinct token ids >= 0, got {ids[:8]}")
        for t, b in self.logit_bias:
            if not (-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS):
                raise UsageError(f"logit_bias for token {t} must be a number from {-MAX_LOGIT_BIAS:g} to "
                                 f"{MAX_LOGIT_BIAS:g}, got {b}")
        return self


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class Sampler:
    """Draws one token id per call from a (V,) float32 logits vector.

    Holds the RNG and work buffers of size V. With top-k on (the default) a step allocates only
    O(k) arrays besides argpartition's (V,) int64 index; with top-k off, the surviving set.
    Not thread-safe: use one Sampler per sequence.

    `n_prompt`: how many leading tokens of every `history` are the prompt; the presence and frequency
    penalties count only the tokens after them (OpenAI's definition), the repeat penalty counts all.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, n_prompt: int = 0,
                 mask: Callable[[np.ndarray], None] | None = None) -> None:
        params.validate()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        bad = [t for t, _ in params.logit_bias if t >= vocab_size]
        if bad:
            raise UsageError(f"logit_bias names token {bad[0]}, outside the vocabulary (0..{vocab_size - 1})")
        self.params = params
        self.vocab_size = vocab_size
        self.n_prompt = n_prompt
        self.mask = mask  # sets forbidden tokens' logits to -inf in place (a grammar: engine/grammar.py); None = off
        self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)  # (b,)
        self._bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)  # (b,)
        self._logits = np.empty(vocab_size, dtype=np.float32)  # (V,) penalised copy
        self._scratch = np.empty(vocab_size, dtype=np.float32)  # (V,) logits sorted in place
        self._exp = np.empty(vocab_size, dtype=np.float32)  # (V,) exp(logit - max)
        self._cum = np.empty(vocab_size, dtype=np.float64)  # (V,) cumulative-mass scratch
        self._mask = np.empty(vocab_size, dtype=np.bool_)  # (V,) min-p survivors
        self._all_ids = np.arange(vocab_size, dtype=np.int64)  # (V,) identity candidate set
        self._log_min_p = np.float32(math.log(params.min_p)) if params.min_p > 0 else None
        self.reset()

    def reset(self) -> None:
        """Re-seed the RNG like llama.cpp's dist: the same seed again, or a fresh one if None."""
        self._rng = np.random.Generator(np.random.PCG64(self.params.seed))

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Return the next token id. `logits` (V,) is not modified; `history` = tokens so far."""
        w = self._penalised(logits, history)
        if self.params.temperature == 0.0:
            return int(np.argmax(w))  # first maximum = lowest id on ties
        ids, vals = self._candidates(w)
        if len(ids) == 1:
            return int(ids[0])
        e = self._weights(vals)  # (n,) f32, unnormalised
        cum = np.cumsum(e, dtype=np.float64, out=self._cum[:len(e)])  # (n,) f64
        # First token whose running mass exceeds u * total (llama.cpp uses >=; '>' never picks
        # a zero-probability token when u == 0).
        i = int(np.searchsorted(cum, self._rng.random() * cum[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The distribution `sample` draws from: candidate ids (n,) int64 and probabilities (n,) float64
        summing to 1. Greedy: the argmax with probability 1. Speculative verification compares the
        target's and the draft's distributions through it, so both pass the same sampling chain."""
        w = self._penalised(logits, history)
        if self.params.temperature == 0.0:
            return np.array([int(np.argmax(w))], np.int64), np.ones(1)
        ids, vals = self._candidates(w)
        ids = np.array(ids, np.int64)
        if len(ids) == 1:
            return ids, np.ones(1)
        e = self._weights(vals).astype(np.float64)  # (n,)
        return ids, e / e.sum()

    def draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """One id from a distribution (ids (n,), probs (n,) summing to ~1) with this sampler's RNG."""
        cum = np.cumsum(probs)  # (n,)
        i = int(np.searchsorted(cum, self._rng.random() * cum[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def uniform(self) -> float:
        """A uniform draw in [0, 1) from this sampler's RNG (speculative acceptance tests)."""
        return float(self._rng.random())

    def _penalised(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """A (V,) float32 copy of `logits` with the logit bias, the penalties and the mask applied. `sample` and
        `distribution` both start here, so speculative verification sees the same chain as sampling."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits shape {logits.shape} != ({self.vocab_size},)")
        w = self._logits  # (V,) f32
        np.copyto(w, logits, casting="same_kind")
        if self._bias_ids.size:
            w[self._bias_ids] += self._bias
        self._apply_penalties(w, history)
        if self.mask is not None:  # after bias and penalties, before top-k/top-p/temperature
            self.mask(w)
        return w

    def _candidates(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """top-k → top-p → min-p on penalised logits w (V,): candidate ids (n,) and logits (n,)."""
        ids, vals, is_sorted = self._top_k(w)
        if self.params.top_p < 1.0:
            ids, vals = self._top_p(ids, vals, is_sorted)
        if self._log_min_p is not None:
            ids, vals = self._min_p(ids, vals)
        return ids, vals

    def _weights(self, vals: np.ndarray) -> np.ndarray:
        """exp((vals - max) / temperature) as llama.cpp's dist computes it: (n,) float32, unnormalised."""
        scaled = np.divide(vals, np.float32(self.params.temperature), out=self._exp[:len(vals)])  # (n,)
        return self._exp_shifted(scaled, _finite_max(scaled), scaled)

    # --- chain stages; each takes and returns candidates `ids` (n,) int64, `vals` (n,) f32 ---

    def _apply_penalties(self, w: np.ndarray, history: Sequence[int]) -> None:
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and len(history) > 0:
            recent = history if p.repeat_last_n == -1 else history[-p.repeat_last_n :]
            toks = self._distinct(recent)  # (u,) each penalised once
            v = w[toks]  # (u,)
            rp = np.float32(p.repeat_penalty)
            w[toks] = np.where(v <= 0, v * rp, v / rp)
        generated = history[self.n_prompt :]
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and len(generated) > 0:
            # Costs a sort of the generated tokens per step, only when one of the two is on.
            toks, counts = self._distinct(generated, counts=True)  # (u,), (u,)
            w[toks] -= (counts * p.frequency_penalty + p.presence_penalty).astype(np.float32)

    def _distinct(self, tokens: Sequence[int], counts: bool = False):
        """The distinct ids of `tokens` (u,) int64 ascending (and their counts (u,) with counts=True)."""
        out = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=counts)
        toks = out[0] if counts else out
        if toks[0] < 0 or toks[-1] >= self.vocab_size:
            raise ValueError(f"history holds token ids outside [0, {self.vocab_size})")
        return out

    def _top_k(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        k = self.params.top_k
        V = self.vocab_size
        if k == 0 or k >= V:
            return self._all_ids, w, False  # same set as llama.cpp, without sorting V logits
        ids = np.argpartition(w, V - k)[V - k :]  # (k,) unordered
        vals = w[ids]  # (k,)
        order = np.lexsort((ids, -vals))  # logit descending, then id ascending
        return ids[order], vals[order], True

    def _top_p(
        self, ids: np.ndarray, vals: np.ndarray, is_sorted: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(vals)
        top_p = self.params.top_p
        vmax = _finite_max(vals)
        if is_sorted:
            desc, total = vals, None  # (n,) logits descending
        else:
            e = self._exp_shifted(vals, vmax, self._exp[:n])  # (n,) f32
            total = e.sum(dtype=np.float64)
            desc = None
            if n > _TOP_P_FULL_SORT_BELOW:
                # Usually a few hundred tokens already hold top_p of the mass: sort only those.
                part = self._scratch[:n]
                np.copyto(part, vals)
                part.partition(n - _TOP_P_PROBE)
                probe = np.sort(part[n - _TOP_P_PROBE :])[::-1]  # (m,) descending
                if np.exp(probe - vmax).sum(dtype=np.float64) >= top_p * total:
                    desc = probe
            if desc is None:
                part = self._scratch[:n]
                np.copyto(part, vals)
                part.sort()  # in place: no (V,) allocation, AVX-512 sort in numpy >= 1.26
                desc = part[::-1]  # (n,) descending
        m = len(desc)
        e_desc = self._exp_shifted(desc, vmax, self._exp[:m])  # (m,) f32
        cum = np.cumsum(e_desc, dtype=np.float64, out=self._cum[:m])  # (m,) f64
        if total is None:
            total = cum[-1]
        # The first position whose running mass reaches top_p is the last one kept.
        keep = min(int(np.searchsorted(cum, top_p * total, side="left")) + 1, m)
        if is_sorted:
            return ids[:keep], vals[:keep]
        # Unsorted (top-k off, ids = 0..V-1): keep logits >= the cutoff, in id order.
        cutoff = desc[keep - 1]
        mask = np.greater_equal(vals, cutoff, out=self._mask[:n])  # (n,)
        kept_ids, kept_vals = ids[mask], vals[mask]
        extra = len(kept_ids) - keep
        if extra > 0:  # ties at the cutoff: drop the highest ids, as the sorted path would
            tied = np.flatnonzero(kept_vals == cutoff)
            kept_ids = np.delete(kept_ids, tied[-extra:])
            kept_vals = np.delete(kept_vals, tied[-extra:])
        return kept_ids, kept_vals

    def _min_p(self, ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); float32 as llama.cpp.
        threshold = vals.max() + self._log_min_p
        mask = np.greater_equal(vals, threshold, out=self._mask[: len(vals)])  # (n,)
        if mask.all():
            return ids, vals
        return ids[mask], vals[mask]

    @staticmethod
    def _exp_shifted(vals: np.ndarray, vmax: float, out: np.ndarray) -> np.ndarray:
        """exp(vals - vmax) into the float32 buffer `out` (may alias `vals`), as llama.cpp does."""
        np.subtract(vals, np.float32(vmax), out=out)
        return np.exp(out, out=out)


def _finite_max(vals: np.ndarray) -> float:
    vmax = float(vals.max())
    if not math.isfinite(vmax):
        raise ValueError(f"cannot sample: the largest logit is {vmax}")
    return vmax


def top_logprobs(logits: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """The k most likely token ids with their log-probabilities under softmax(logits).

    Computed in float64 with log-sum-exp; sorted by probability descending, lower id first on ties.
    """
    if logits.ndim != 1:
        raise ValueError(f"logits must be 1-D, got shape {logits.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    V = logits.shape[0]
    k = min(k, V)
    if k == 0:
        return []
    x = logits.astype(np.float64)  # (V,)
    vmax = _finite_max(x)
    log_z = vmax + math.log(np.exp(x - vmax).sum())
    ids = np.argpartition(x, V - k)[V - k :]  # (k,)
    ids = ids[np.lexsort((ids, -x[ids]))]
    return [(int(i), float(x[i] - log_z)) for i in ids]
