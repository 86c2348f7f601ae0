"""Attention of several sequences' new rows, each over its own KV cache, in one parallel region.

A batched decode step of B sequences used to run `ops.attention` once per sequence and layer: B parallel
regions of a couple of jobs each (one token's query heads), every one paying a thread wake-up and a join for
microseconds of work. Here the jobs of all sequences share one region. Each job is `ops.attention_job` on
the sequence's own rows and cache, so every (token, head) gets exactly the bits of the per-sequence call.

    kv = KVLists.of(seqs)                           # once per pass: (first row, rows, cache) of each
    attention_seqs(out, q, kv, layer, scale)
"""

from __future__ import annotations

import numpy as np
from numba import prange
from numba.typed import List

from .ops import NO_SINKS, attention_job, attention_jobs, pick, twins


def _attention_seqs(out, q, k_caches, v_caches, layer, row0, pos0, scale, sinks, window):
    """out, q: (T, H, d), the rows of sequence j being row0[j] .. row0[j + 1] - 1; k_caches[j], v_caches[j]:
    its cache arrays (L, K, S_j, W); pos0: (B,) its positions before these rows; sinks, window: as
    `ops.attention_job`."""
    T, H, _ = q.shape
    per_row = attention_jobs(1, H, k_caches[0].shape[1])
    for job in prange(T * per_row):
        t = job // per_row
        j = 0
        while row0[j + 1] <= t:  # the sequence of row t (a handful of sequences: a scan is enough)
            j += 1
        r0, r1 = row0[j], row0[j + 1]
        attention_job(out[r0:r1], q[r0:r1], k_caches[j][layer], v_caches[j][layer], pos0[j], scale,
                      job - r0 * per_row, sinks, window)


ATTENTION_SEQS = twins(_attention_seqs)


class KVLists:
    """The sequences of one pass as the several-row kernels take them, built once per pass: each sequence's cache
    arrays as typed lists, row0 (B + 1,) int64 the first row of each sequence then T, pos0 (B,) int64 each
    cache's length before the pass."""

    def __init__(self, k: List, v: List, row0: np.ndarray, pos0: np.ndarray):
        self.k, self.v, self.row0, self.pos0 = k, v, row0, pos0

    @classmethod
    def of(cls, seqs) -> KVLists:
        """seqs: (first row, rows, KVCache) of each sequence, in row order."""
        k, v = List(), List()
        for *_, c in seqs:
            k.append(c.k)
            v.append(c.v)
        row0 = np.array([r0 for r0, _, _ in seqs] + [seqs[-1][0] + seqs[-1][1]], dtype=np.int64)  # (B + 1,)
        return cls(k, v, row0, np.array([c.length for *_, c in seqs], dtype=np.int64))


def attention_seqs(out, q, kv: KVLists, layer: int, scale: float, sinks=NO_SINKS, window: int = 0) -> None:
    """out, q: (T, H, d), the rows of kv's sequences; sinks (H,) read-only or NO_SINKS; window 0: full."""
    longest = int(kv.pos0.max()) + q.shape[0]
    if window > 0:
        longest = min(longest, window)
    pick(ATTENTION_SEQS, q.size * longest * 2)(out, q, kv.k, kv.v, layer, kv.row0, kv.pos0, np.float32(scale),
                                               sinks, int(window))
