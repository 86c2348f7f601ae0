"""The expert block of several tokens (a prompt chunk, a verified draft, a batched step of several sequences) in
one parallel region per group of experts, every row with the bits `fused._moe_template` gives it alone.

Bound per weight kind by `fused._specialise`, as the other fused templates (`fused.py`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .ops import expert_activation
from .sync import claim, finish, wait_done

# Bound per weight kind by `fused._specialise` (the template is never compiled itself).
GU_QUANT = GU_ROWS = DOWN_QUANT = DOWN_ROWS = None


def _moe_rows_template(n_threads, out, acc, last, resid, h, mats, n_per, slot_w, slot_tok, slot_j, exp_start,
                       exp_slots, tok_start, xq, xd, xs, xg, xdg, xsg, gu, hbuf, hq, hd, hs, ys, tmp, downs, gu_variant,
                       down_variant, sync, chunk, gate_b, up_b, down_b, bias_ids, alpha, limit):
    """One group of experts of the expert block of T tokens: acc (T, D) += per token t, the sum over its slots
    s of this group (in order) of slot_w[s] * down_u(silu(gate_u h_t) * up_u h_t), u the slot's expert; with
    `last`, out (T, D) = resid + acc instead. Groups in increasing expert id keep every token's sum in order.

    mats: the group's experts' gate|up matrices, `n_per` per expert (as `fused._moe_template`); downs: their
    down matrices (a group always has MOE_GROUP experts, padded with ones no slot uses, so one compiled
    kernel serves every count). Slots 0..S-1 are grouped by token (token t owns
    tok_start[t]..tok_start[t+1]-1, in the order its outputs are summed); slot_tok (S,) its token. The slots
    are worked on grouped by expert: position j holds slot exp_slots[j], expert u owns positions
    exp_start[u]..exp_start[u+1]-1, and slot_j (S,) is each slot's position. Each weight chunk is unpacked once
    for all the positions of its expert (the `rows` kernels take several tokens per pass) and every row gets the
    bits it gets alone.
    Scratch: xq, xd, xs: (T, ...) activations of h; xg, xdg, xsg: (S, ...) the same per position; gu (S * 2I,)
    f32; hbuf (S, I) f32; hq, hd, hs: (S, ...) activations of hbuf; ys (S, D) f32, all by position;
    tmp (n_threads, S * chunk) f32 (an expert has at most T positions, unless a router's NaN picked it twice
    for one token); sync: (3 * SYNC_SLOTS,) int64 zeros. gate_b, up_b, down_b, bias_ids, alpha, limit: as
    `fused._moe_template`'s, one bias row id per expert of the group.
    """
    T, D = out.shape
    S = slot_w.shape[0]
    U = len(downs)
    n_i = hbuf.shape[1]
    r1 = 2 * n_i // n_per  # rows per matrix of `mats`
    per_mat = (r1 + chunk - 1) // chunk
    n1 = len(mats) * per_mat
    n3 = (D + chunk - 1) // chunk
    for t in range(T):
        GU_QUANT(xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], h[t:t + 1])
    pos_u = np.empty(S, np.int64)  # each position's expert
    for u in range(U):
        pos_u[exp_start[u]:exp_start[u + 1]] = u
    for j in range(S):  # each position's activations: its slot's token's
        t = slot_tok[exp_slots[j]]
        xg[j, :] = xq[t, :]
        xdg[j, :] = xd[t, :]
        xsg[j, :] = xs[t, :]
    for it in prange(n_threads):
        back = it % 2 == 1  # odd iterations take chunks from the back
        c = claim(sync, 0, n1, back)
        while c >= 0:  # gate and up rows, for every position of the chunk's expert at once
            m = c // per_mat
            u = m // n_per
            at = (m % n_per) * r1
            lo = (c % per_mat) * chunk
            hi = min(lo + chunk, r1)
            j0, j1 = exp_start[u], exp_start[u + 1]
            if j1 > j0:
                blk = tmp[it][:(j1 - j0) * (hi - lo)].reshape(j1 - j0, hi - lo)
                GU_ROWS(blk, lo, hi, mats[m], xg[j0:j1], xdg[j0:j1], xsg[j0:j1], gu_variant)
                for k in range(j1 - j0):
                    o = (j0 + k) * 2 * n_i + at + lo
                    for r in range(hi - lo):
                        gu[o + r] = blk[k, r]
            finish(sync, 0)
            c = claim(sync, 0, n1, back)
        wait_done(sync, 0, n1)
        j = claim(sync, 1, S, back)
        while j >= 0:  # SwiGLU and the down projection's activations, per position
            expert_activation(hbuf[j:j + 1], gu, j * 2 * n_i, n_i, gate_b, up_b,
                              bias_ids[pos_u[j]] if bias_ids.shape[0] else 0, alpha, limit)
            DOWN_QUANT(hq[j:j + 1], hd[j:j + 1], hs[j:j + 1], hbuf[j:j + 1])
            finish(sync, 1)
            j = claim(sync, 1, S, back)
        wait_done(sync, 1, S)
        c = claim(sync, 2, n3, back)
        while c >= 0:  # down rows of every position, then each token's sum in order plus the residual
            lo = c * chunk
            hi = min(lo + chunk, D)
            for u in range(U):
                j0, j1 = exp_start[u], exp_start[u + 1]
                if j1 > j0:
                    blk = tmp[it][:(j1 - j0) * (hi - lo)].reshape(j1 - j0, hi - lo)
                    DOWN_ROWS(blk, lo, hi, downs[u], hq[j0:j1], hd[j0:j1], hs[j0:j1], down_variant)
                    for k in range(j1 - j0):
                        for r in range(hi - lo):
                            ys[j0 + k, lo + r] = blk[k, r]
                    if down_b.shape[0]:
                        for k in range(j1 - j0):
                            for r in range(hi - lo):
                                ys[j0 + k, lo + r] += down_b[bias_ids[u], lo + r]
            for t in range(T):
                for r in range(lo, hi):
                    a = acc[t, r]
                    for s in range(tok_start[t], tok_start[t + 1]):
                        a += slot_w[s] * ys[slot_j[s], r]
                    if last:
                        out[t, r] = resid[t, r] + a
                    else:
                        acc[t, r] = a
            finish(sync, 2)
            c = claim(sync, 2, n3, back)
