"""The attention block of a step of several rows — a prompt chunk or verified draft of one sequence, or the
new rows of several sequences, each over its own KV cache — in one parallel region.

    out (T, D) = x + o_proj(attention(rope(qkv_proj(rmsnorm(x))))), each row's k and v written into its
    sequence's cache; phases: qkv rows | rope + KV-cache writes | attention jobs of every sequence | quantise |
    o_proj rows + residual

Each weight chunk is read and unpacked once for all rows (the `rows` kernels take several tokens at a time);
every row gets the bits the serial code gives it alone (the attention of sequence j is `ops.attention_job` on
its rows and cache), so the bits of the separate kernels and of the single-sequence blocks. The template is
specialised per weight kinds by `fused.kernel_for`.
"""

from __future__ import annotations

from numba import prange

from .kv_access import store_kv_row
from .ops import RMSNORM, ROPE_INPLACE, attention_job, attention_jobs, qk_inputs
from .sync import claim, finish, wait_done

# Bound per weight kind by `fused._specialise` (the template is never compiled itself).
QKV_QUANT = QKV_ROWS = O_QUANT = O_ROWS = None
RMSNORM_SERIAL, ROPE_SERIAL = RMSNORM[1], ROPE_INPLACE[1]


def _attention_seqs_template(n_threads, out, x, norm_w, eps, w_qkv, xq, xd, xs, qkv, q, k, v, cos, sin, k_caches,
                             v_caches, layer, row0, pos0, scale, att, aq, ad, as_, w_o, obuf, qkv_variant, o_variant,
                             hbuf, tmp, sync, chunk, qkv_bias, q_norm, k_norm, clip, o_bias, sinks, window):
    """Rows row0[j] .. row0[j + 1] - 1 of x (T, D) continue sequence j at positions pos0[j].., whose caches are
    k_caches[j][layer], v_caches[j][layer] (K, S_j, W). cos, sin: (T, d/2) at each row's own position.

    Scratch: hbuf (T, D) f32; xq, xd, xs: (T, ...) activations of hbuf; qkv (T, (H + 2K) d) f32; q (T, H, d),
    k, v (T, K, d) f32; att (T, H, d) f32; aq, ad, as_: (T, ...) activations of att; obuf (T, D) f32; tmp
    (n_threads, T * chunk) f32; sync: (5 * SYNC_SLOTS,) int64 zeros. Families' extras as in fused._attention_template."""
    T, D = x.shape
    n_heads, d = q.shape[1], q.shape[2]
    n_kv = k.shape[1]
    hq = n_heads * d
    hk = n_kv * d
    r_qkv = hq + 2 * hk
    n1 = (r_qkv + chunk - 1) // chunk
    per_row = attention_jobs(1, n_heads, n_kv)
    n3 = T * per_row
    n5 = (D + chunk - 1) // chunk
    RMSNORM_SERIAL(hbuf, x, norm_w, eps)
    for t in range(T):
        QKV_QUANT(xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], hbuf[t:t + 1])
    for it in prange(n_threads):
        back = it % 2 == 1  # odd iterations take chunks from the back
        c = claim(sync, 0, n1, back)
        while c >= 0:  # q, k, v rows of every token, each weight chunk unpacked once for all
            lo = c * chunk
            hi = min(lo + chunk, r_qkv)
            blk = tmp[it][:T * (hi - lo)].reshape(T, hi - lo)
            QKV_ROWS(blk, lo, hi, w_qkv, xq, xd, xs, qkv_variant)
            for t in range(T):
                for r in range(hi - lo):
                    qkv[t, lo + r] = blk[t, r]
            finish(sync, 0)
            c = claim(sync, 0, n1, back)
        wait_done(sync, 0, n1)
        if claim(sync, 1, 1, back) == 0:  # biases, split q/k/v, q/k norms, RoPE, then each row into its cache
            for t in range(T):
                for i in range(qkv_bias.shape[0]):
                    qkv[t, i] += qkv_bias[i]
                for h in range(n_heads):
                    for i in range(d):
                        q[t, h, i] = qkv[t, h * d + i]
                for j in range(n_kv):
                    for i in range(d):
                        k[t, j, i] = qkv[t, hq + j * d + i]
                        v[t, j, i] = qkv[t, hq + hk + j * d + i]
            qk_inputs(q, k, v, q_norm, k_norm, eps, clip)
            ROPE_SERIAL(q, cos, sin)
            ROPE_SERIAL(k, cos, sin)
            for s in range(pos0.shape[0]):
                kc, vc = k_caches[s][layer], v_caches[s][layer]
                S, W = kc.shape[1], kc.shape[2]
                for t in range(row0[s], row0[s + 1]):
                    p = pos0[s] + t - row0[s]
                    for j in range(n_kv):
                        store_kv_row(kc, (j * S + p) * W, k[t, j], d)
                        store_kv_row(vc, (j * S + p) * W, v[t, j], d)
            finish(sync, 1)
        wait_done(sync, 1, 1)
        c = claim(sync, 2, n3, back)
        while c >= 0:  # job c: row t's query heads; its sequence by a scan (a handful of sequences)
            t = c // per_row
            s = 0
            while row0[s + 1] <= t:
                s += 1
            r0, r1 = row0[s], row0[s + 1]
            attention_job(att[r0:r1], q[r0:r1], k_caches[s][layer], v_caches[s][layer], pos0[s], scale,
                          c - r0 * per_row, sinks, window)
            finish(sync, 2)
            c = claim(sync, 2, n3, back)
        wait_done(sync, 2, n3)
        if claim(sync, 3, 1, back) == 0:
            for t in range(T):
                O_QUANT(aq[t:t + 1], ad[t:t + 1], as_[t:t + 1], att[t].reshape(1, hq))
            finish(sync, 3)
        wait_done(sync, 3, 1)
        c = claim(sync, 4, n5, back)
        while c >= 0:  # o_proj rows of every token plus the residual
            lo = c * chunk
            hi = min(lo + chunk, D)
            blk = tmp[it][:T * (hi - lo)].reshape(T, hi - lo)
            O_ROWS(blk, lo, hi, w_o, aq, ad, as_, o_variant)
            for t in range(T):
                for r in range(hi - lo):
                    obuf[t, lo + r] = blk[t, r]
                if o_bias.shape[0] > 0:
                    for r in range(lo, hi):
                        obuf[t, r] += o_bias[r]
                for r in range(lo, hi):
                    out[t, r] = x[t, r] + obuf[t, r]
            finish(sync, 4)
            c = claim(sync, 4, n5, back)
