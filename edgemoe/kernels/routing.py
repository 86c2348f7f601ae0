"""DeepSeek's routing: scores, expert groups, then the top experts of the eligible groups.

Legend: T tokens, E experts, G groups, A experts per token.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def route_grouped(ids, weights, logits, bias, sigmoid, n_group, topk_group, top2, renorm, scale):
    """Per token (rows are independent, so a row's choice does not depend on its batch):
    scores = softmax(logits) or sigmoid(logits); choice = scores + bias (bias: (E,) or empty);
    each of the n_group groups is scored by its best choice (or, with `top2`, the sum of its best two), the
    topk_group best groups stay eligible; the A best choices among them are the experts, weighted by their
    scores (renormalised to sum to 1 when `renorm`) × scale.

    ids: (T, A) int64; weights: (T, A) f32; logits: (T, E) f32
    """
    T, E = logits.shape
    A = ids.shape[1]
    per = E // n_group
    scores = np.empty(E, np.float32)
    choice = np.empty(E, np.float32)
    gscore = np.empty(n_group, np.float32)
    eligible = np.empty(n_group, np.bool_)
    for t in range(T):
        if sigmoid:
            for e in range(E):
                scores[e] = np.float32(1.0 / (1.0 + math.exp(-logits[t, e])))
        else:
            m = logits[t, 0]
            for e in range(1, E):
                m = max(m, logits[t, e])
            total = np.float32(0.0)
            for e in range(E):
                scores[e] = np.float32(math.exp(logits[t, e] - m))
                total += scores[e]
            for e in range(E):
                scores[e] = scores[e] / total
        for e in range(E):
            choice[e] = scores[e] + (bias[e] if bias.shape[0] > 0 else np.float32(0.0))
        for g in range(n_group):
            b1 = -np.inf
            b2 = -np.inf
            for e in range(g * per, (g + 1) * per):
                c = choice[e]
                if c > b1:
                    b2 = b1
                    b1 = c
                elif c > b2:
                    b2 = c
            gscore[g] = b1 + b2 if top2 else b1
            eligible[g] = False
        for _ in range(min(topk_group, n_group)):
            best = -1
            for g in range(n_group):
                if not eligible[g] and (best < 0 or gscore[g] > gscore[best]):
                    best = g
            eligible[best] = True
        kept = np.float32(0.0)
        for a in range(A):
            best = -1
            for e in range(E):
                if eligible[e // per] and (best < 0 or choice[e] > choice[best]):
                    best = e
            ids[t, a] = best
            weights[t, a] = scores[best]
            kept += scores[best]
            choice[best] = -np.inf  # taken
        for a in range(A):
            w = weights[t, a] / (kept + np.float32(1e-20)) if renorm else weights[t, a]
            weights[t, a] = w * np.float32(scale)


@njit(cache=True, nogil=True)
def route_topk_softmax(ids, weights, logits):
    """gpt-oss routing per token: the A largest logits (lower expert id first on ties), then a softmax over
    those A only.   ids: (T, A) int64; weights: (T, A) f32; logits: (T, E) f32 (router bias included)"""
    T, E = logits.shape
    A = ids.shape[1]
    taken = np.zeros(E, np.bool_)
    for t in range(T):
        taken[:] = False
        for a in range(A):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or logits[t, e] > logits[t, best]):
                    best = e
            ids[t, a] = best
            taken[best] = True
        m = logits[t, ids[t, 0]]
        total = np.float32(0.0)
        for a in range(A):
            weights[t, a] = np.float32(math.exp(logits[t, ids[t, a]] - m))
            total += weights[t, a]
        for a in range(A):
            weights[t, a] = weights[t, a] / total
