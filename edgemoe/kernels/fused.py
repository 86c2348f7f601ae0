"""One token's attention block and one token's expert block, each in a single parallel region.

Decoding one token runs ~25 small kernels per layer; as separate calls each is its own parallel
region (a launch, then a join that waits for the slower thread, which on a shared 2-vCPU box is often
a scheduler slice late) with Python in between. Here each block is one call: its phases are split
into chunks that the threads claim from shared counters (`sync`), and a phase starts once every
chunk of the one before is done. The matrix rows are computed by the serial kernels of `rows`, and
every other step is the same code as the separate path, so the results are bit-identical to it.

    attention block (one layer): x (D,) -> x + o_proj(attention(rope(qkv_proj(rmsnorm(x)))))
        phases: qkv rows | rope + KV-cache write | attention jobs | quantise | o_proj rows + residual
    expert block: x (D,) -> x + sum_a w_a down_a(silu(gate_a h) * up_a h), experts in the given order
        phases: gate/up rows of every expert | SwiGLU + quantise per expert | down rows + sum + residual

Steps of several rows (a prompt chunk, a verified draft, a batched step of several sequences) run the expert
block over all rows (`fused_rows.py`) and the attention block of `fused_seqs.py`.

A kernel is compiled per combination of weight kinds (`kinds.KINDS`): the template's code is bound to
that kind's functions under its own name, which Numba's on-disk cache keys on.
"""

from __future__ import annotations

import threading
import types

import numba
import numpy as np
from numba import njit, prange

from ..qtensor import QTensor
from . import compile_ahead, dispatch
from .fused_rows import _moe_rows_template
from .fused_seqs import _attention_seqs_template
from .kinds import Kind, kind_of
from .kv_access import store_kv_row
from .ops import RMSNORM, ROPE_INPLACE, attention_job, attention_jobs, expert_activation, qk_inputs
from .q8act import activations
from .sync import SYNC_SLOTS, claim, finish, wait_done

CHUNK_ROWS = 128  # matrix rows per chunk (a multiple of 8): ~35-70 KB of weights, a few µs of work

# Bound per weight kind by `_specialise` (the templates are never compiled themselves).
GU_QUANT = GU_ROWS = DOWN_QUANT = DOWN_ROWS = QKV_QUANT = QKV_ROWS = O_QUANT = O_ROWS = None
RMSNORM_SERIAL, ROPE_SERIAL = RMSNORM[1], ROPE_INPLACE[1]


def _moe_template(n_threads, out, resid, h, mats, n_per, w_exp, xq, xd, xs, gu, hbuf, hq, hd, hs, ys, downs,
                  gu_variant, down_variant, sync, chunk, gate_b, up_b, down_b, bias_ids, alpha, limit):
    """out (D,) = resid + sum_a w_exp[a] * down_a(silu(gate_a h) * up_a h).
    With biases (the layer's gate_b, up_b (E, I), down_b (E, D), expert a's row bias_ids[a]; (0, 0) arrays when
    absent) gpt-oss's expert instead: down_a(ops._clamped_swiglu(gate_a h, up_a h)) + down_b[bias_ids[a]], the
    activation's alpha and limit as given.

    mats: the experts' gate|up matrices, `n_per` per expert in expert order (1: gate and up stacked,
    2I rows; 2: gate then up, I rows each); downs: the down matrices (D, I).
    Scratch: xq, xd, xs: (1, ...) activations of h; gu: (A * 2I,) f32; hbuf: (A, I) f32;
    hq, hd, hs: (A, ...) activations of hbuf; ys: (A, D) f32. sync: (3 * SYNC_SLOTS,) int64 zeros;
    n_threads: iterations of the parallel loop (the threads kernels use); chunk: rows per chunk.
    """
    A = w_exp.shape[0]
    D = out.shape[0]
    n_i = hbuf.shape[1]
    r1 = 2 * n_i // n_per  # rows per matrix of `mats`
    per_mat = (r1 + chunk - 1) // chunk
    n1 = len(mats) * per_mat
    n3 = (D + chunk - 1) // chunk
    GU_QUANT(xq, xd, xs, h.reshape(1, D))
    for it in prange(n_threads):
        back = it % 2 == 1  # odd iterations take chunks from the back
        c = claim(sync, 0, n1, back)
        while c >= 0:  # gate and up rows
            m = c // per_mat
            lo = (c % per_mat) * chunk
            hi = min(lo + chunk, r1)
            GU_ROWS(gu[m * r1 + lo:m * r1 + hi].reshape(1, hi - lo), lo, hi, mats[m], xq, xd, xs, gu_variant)
            finish(sync, 0)
            c = claim(sync, 0, n1, back)
        wait_done(sync, 0, n1)
        a = claim(sync, 1, A, back)
        while a >= 0:  # SwiGLU and the down projection's activations, per expert
            expert_activation(hbuf[a:a + 1], gu, a * 2 * n_i, n_i, gate_b, up_b, bias_ids[a] if bias_ids.shape[0] else 0,
                              alpha, limit)
            DOWN_QUANT(hq[a:a + 1], hd[a:a + 1], hs[a:a + 1], hbuf[a:a + 1])
            finish(sync, 1)
            a = claim(sync, 1, A, back)
        wait_done(sync, 1, A)
        c = claim(sync, 2, n3, back)
        while c >= 0:  # down rows of every expert, summed in order, plus the residual
            lo = c * chunk
            hi = min(lo + chunk, D)
            for e in range(A):
                DOWN_ROWS(ys[e][lo:hi].reshape(1, hi - lo), lo, hi, downs[e], hq[e:e + 1], hd[e:e + 1], hs[e:e + 1],
                          down_variant)
                if down_b.shape[0]:
                    for r in range(lo, hi):
                        ys[e, r] += down_b[bias_ids[e], r]
            for r in range(lo, hi):
                acc = np.float32(0.0)
                for e in range(A):
                    acc += w_exp[e] * ys[e, r]
                out[r] = resid[r] + acc
            finish(sync, 2)
            c = claim(sync, 2, n3, back)


def _attention_template(n_threads, out, x, norm_w, eps, w_qkv, xq, xd, xs, qkv, n_heads, n_kv, cos, sin, k_cache,
                        v_cache, pos, scale, att, aq, ad, as_, w_o, obuf, qkv_variant, o_variant, hbuf, sync, chunk,
                        qkv_bias, q_norm, k_norm, clip, o_bias, sinks, window):
    """out (D,) = x + o_proj(attention(rope(qkv_proj(rmsnorm(x)))) of one token at position `pos`,
    whose k and v are written into k_cache[:, pos], v_cache[:, pos] (K, S, d).
    The families' extras (empty arrays / clip 0 when absent): qkv_bias ((H + 2K) d,) added to the projections,
    q_norm/k_norm and clip as ops.qk_inputs, o_bias (D,) added to o_proj's output, sinks (H,) and window as
    ops.attention_job.

    Scratch: hbuf (1, D) f32; xq, xd, xs: (1, ...) activations of hbuf; qkv ((H + 2K) d,) f32;
    att (1, H, d) f32; aq, ad, as_: (1, ...) activations of att; obuf (D,) f32.
    cos, sin: (1, d/2) rotary tables of the position; sync: (5 * SYNC_SLOTS,) int64 zeros;
    n_threads: iterations of the parallel loop (the threads kernels use); chunk: rows per chunk.
    """
    D = x.shape[0]
    d = att.shape[2]
    hq = n_heads * d
    hk = n_kv * d
    r_qkv = hq + 2 * hk
    n1 = (r_qkv + chunk - 1) // chunk
    n3 = attention_jobs(1, n_heads, n_kv)
    n5 = (D + chunk - 1) // chunk
    q = qkv[:hq].reshape(1, n_heads, d)
    k = qkv[hq:hq + hk].reshape(1, n_kv, d)
    v = qkv[hq + hk:].reshape(1, n_kv, d)
    RMSNORM_SERIAL(hbuf, x.reshape(1, D), norm_w, eps)
    QKV_QUANT(xq, xd, xs, hbuf)
    for it in prange(n_threads):
        back = it % 2 == 1  # odd iterations take chunks from the back
        c = claim(sync, 0, n1, back)
        while c >= 0:  # q, k, v rows
            lo = c * chunk
            hi = min(lo + chunk, r_qkv)
            QKV_ROWS(qkv[lo:hi].reshape(1, hi - lo), lo, hi, w_qkv, xq, xd, xs, qkv_variant)
            finish(sync, 0)
            c = claim(sync, 0, n1, back)
        wait_done(sync, 0, n1)
        if claim(sync, 1, 1, back) == 0:  # biases, q/k norms, RoPE, then the new position into the cache
            for i in range(qkv_bias.shape[0]):
                qkv[i] += qkv_bias[i]
            qk_inputs(q, k, v, q_norm, k_norm, eps, clip)
            ROPE_SERIAL(q, cos, sin)
            ROPE_SERIAL(k, cos, sin)
            S, W = k_cache.shape[1], k_cache.shape[2]
            for j in range(n_kv):
                store_kv_row(k_cache, (j * S + pos) * W, k[0, j], d)
                store_kv_row(v_cache, (j * S + pos) * W, v[0, j], d)
            finish(sync, 1)
        wait_done(sync, 1, 1)
        c = claim(sync, 2, n3, back)
        while c >= 0:
            attention_job(att, q, k_cache, v_cache, pos, scale, c, sinks, window)
            finish(sync, 2)
            c = claim(sync, 2, n3, back)
        wait_done(sync, 2, n3)
        if claim(sync, 3, 1, back) == 0:
            O_QUANT(aq, ad, as_, att.reshape(1, hq))
            finish(sync, 3)
        wait_done(sync, 3, 1)
        c = claim(sync, 4, n5, back)
        while c >= 0:  # o_proj rows plus the residual
            lo = c * chunk
            hi = min(lo + chunk, D)
            O_ROWS(obuf[lo:hi].reshape(1, hi - lo), lo, hi, w_o, aq, ad, as_, o_variant)
            if o_bias.shape[0] > 0:
                for r in range(lo, hi):
                    obuf[r] += o_bias[r]
            for r in range(lo, hi):
                out[r] = x[r] + obuf[r]
            finish(sync, 4)
            c = claim(sync, 4, n5, back)


_compiled: dict = {}


def _specialise(template, tag: str, **bound):
    """`template` compiled in parallel with its upper-case globals bound to `bound`, named by `tag`."""
    key = (template.__name__, tag)
    fn = _compiled.get(key)
    if fn is None:
        name = f"{template.__name__}__{tag}"
        py = types.FunctionType(template.__code__, dict(template.__globals__, **bound), name, template.__defaults__)
        py.__qualname__ = name
        fn = _compiled[key] = njit(cache=True, nogil=True, parallel=True)(py)
    return fn


# block -> (template, the names its two matrix stages' functions are bound to)
_BLOCKS = {"moe": (_moe_template, "GU", "DOWN"), "attention": (_attention_template, "QKV", "O"),
           "moe_rows": (_moe_rows_template, "GU", "DOWN"), "attention_seqs": (_attention_seqs_template, "QKV", "O")}


def kernel_for(block: str, first: Kind, second: Kind):
    """The compiled (or cached) kernel of `block` for the kinds of its two matrix stages."""
    template, r1, r2 = _BLOCKS[block]
    return _specialise(template, f"{first.name}_{second.name}", **{
        f"{r1}_QUANT": first.quant, f"{r1}_ROWS": first.rows, f"{r2}_QUANT": second.quant, f"{r2}_ROWS": second.rows})


def _launch(block: str, kinds: tuple[Kind, Kind], args: tuple, ahead: dict | None) -> bool:
    """Run `block`'s kernel on `args`. ahead: None compiles it first if need be; else the caller's state for
    `compile_ahead.ready`: the kernel runs only if it needs no compiling (else False, and it compiles in the
    background)."""
    kernel = kernel_for(block, *kinds)
    if ahead is not None and not compile_ahead.ready(kernel, (block, kinds[0].name, kinds[1].name), args, ahead):
        return False
    kernel(*args)
    return True


_local = threading.local()


def _buffer(key, make):
    """A buffer of this thread reused across calls: `make()` the first time `key` is asked for."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    b = bufs.get(key)
    if b is None:
        b = bufs[key] = make()
    return b


def _scratch(role: str, act: str, n: int, cols: int):
    """(xq, xd, xs) activation buffers of one role: `n` rows of `cols` activations in format `act`."""
    return _buffer((role, act, n, cols), lambda: activations(act, n, cols))


def _f32(role: str, *shape):
    """A float32 scratch array of one role."""
    return _buffer((role, "f32") + shape, lambda: np.empty(shape, np.float32))


def _kinds(first: QTensor, second: QTensor) -> tuple[Kind, Kind] | None:
    """The kinds of the block's two matrix stages, None if a row kernel cannot take one (K-quant
    activations need whole 256-column super-blocks)."""
    kinds = kind_of(first), kind_of(second)
    for k, w in zip(kinds, (first, second)):
        if k is None or w.cols % 256 and k.act.startswith("q8_k"):
            return None
    return kinds


def _variant(w: QTensor):
    return dispatch.variant_marker(w.qtype)


def moe_kinds(gate_up: QTensor | None, gate: QTensor, down: QTensor) -> tuple[Kind, Kind] | None:
    """(gate/up kind, down kind) of an expert when the fused expert block can run it, else None."""
    return _kinds(gate_up if gate_up is not None else gate, down)


def moe_block(x: np.ndarray, h: np.ndarray, experts: list, weights: np.ndarray, kinds: tuple[Kind, Kind],
              ahead: dict | None = None, extras: tuple | None = None) -> np.ndarray | None:
    """x + the weighted sum of `experts` applied to h, for one token.   x, h: (D,) → (D,)

    experts: Expert tuples of one layer with the same types and shapes, in the order their outputs
    are summed; weights: (A,) f32; kinds: from `moe_kinds` on the first expert. With `ahead` (the caller's
    compile_ahead state), None (nothing done) while the kernel is compiling in the background. extras: gpt-oss's
    expert biases and activation (`moe_extras`, a bias row id per expert of `experts`), None for plain SwiGLU.
    """
    k1, k2 = kinds
    e0 = experts[0]
    A, D = len(experts), x.shape[0]
    n_i = e0.down.cols
    if e0.gate_up is not None:
        mats, n_per = tuple(e.gate_up.data for e in experts), 1
    else:
        mats, n_per = tuple(m for e in experts for m in (e.gate.data, e.up.data)), 2
    xq, xd, xs = _scratch("moe_h", k1.act, 1, D)
    hq, hd, hs = _scratch("moe_down", k2.act, A, n_i)
    out = np.empty(D, np.float32)
    args = (numba.get_num_threads(), out, x, h, mats, n_per, weights, xq, xd, xs, _f32("moe_gu", A * 2 * n_i),
            _f32("moe_hb", A, n_i), hq, hd, hs, _f32("moe_ys", A, D), tuple(e.down.data for e in experts),
            _variant(e0.gate if e0.gate_up is None else e0.gate_up), _variant(e0.down),
            np.zeros(3 * SYNC_SLOTS, np.int64), CHUNK_ROWS, *(extras or NO_MOE_EXTRAS))
    return out if _launch("moe", kinds, args, ahead) else None


MOE_GROUP = 4  # experts per call of the several-token expert block


def moe_rows_block(x: np.ndarray, h: np.ndarray, experts: list, slot_w: np.ndarray, slot_tok: np.ndarray,
                   slot_exp: np.ndarray, tok_start: np.ndarray, kinds: tuple[Kind, Kind],
                   ahead: dict | None = None, extras: tuple | None = None) -> np.ndarray | None:
    """x + each token's weighted sum of its experts applied to h, for T tokens; every row gets the bits
    `moe_block` gives it alone.   x, h: (T, D) → (T, D)

    experts: the U distinct Expert tuples in increasing expert id (same types and shapes); slots grouped by
    token as tok_start (T+1,) says, each with its weight slot_w (S,) f32, token slot_tok (S,) and expert
    index slot_exp (S,) into `experts`; kinds: from `moe_kinds` on the first expert. The experts run in
    groups of MOE_GROUP, one parallel region each. With `ahead`, None while the kernel is compiling in the
    background. extras: as `moe_block`'s, one row id per expert of `experts`.
    """
    k1, k2 = kinds
    e0 = experts[0]
    T, D = x.shape
    n_i = e0.down.cols
    out = np.empty((T, D), np.float32)
    acc = np.zeros((T, D), np.float32)
    U = len(experts)
    for g0 in range(0, U, MOE_GROUP):
        group = experts[g0:g0 + MOE_GROUP]
        group = group + [group[0]] * (MOE_GROUP - len(group))  # padding: experts without slots
        g_extras = NO_MOE_EXTRAS if extras is None else \
            (*extras[:3], extras[3][np.minimum(np.arange(g0, g0 + MOE_GROUP), U - 1)], *extras[4:])  # padded likewise
        mine = (slot_exp >= g0) & (slot_exp < g0 + MOE_GROUP)  # (S,) this group's slots, still token-major
        g_exp = slot_exp[mine] - g0
        g_w = np.ascontiguousarray(slot_w[mine])
        g_tok = slot_tok[mine]
        S = g_w.shape[0]
        g_start = np.zeros(T + 1, np.int64)
        np.cumsum(np.bincount(g_tok, minlength=T), out=g_start[1:])
        exp_slots = np.argsort(g_exp, kind="stable")  # (S,) slots of expert 0, then 1, ...
        exp_start = np.searchsorted(g_exp[exp_slots], np.arange(MOE_GROUP + 1))  # (G + 1,)
        slot_j = np.empty(S, np.int64)  # each slot's position in expert order
        slot_j[exp_slots] = np.arange(S)
        if e0.gate_up is not None:
            mats, n_per = tuple(e.gate_up.data for e in group), 1
        else:
            mats, n_per = tuple(m for e in group for m in (e.gate.data, e.up.data)), 2
        xq, xd, xs = _scratch("moe_rows_h", k1.act, T, D)
        xg, xdg, xsg = _scratch("moe_rows_hg", k1.act, S, D)
        hq, hd, hs = _scratch("moe_rows_down", k2.act, S, n_i)
        n_threads = numba.get_num_threads()
        args = (n_threads, out, acc, g0 + MOE_GROUP >= U, x, h, mats, n_per, g_w, g_tok, slot_j, exp_start,
                exp_slots, g_start, xq, xd, xs, xg, xdg, xsg, _f32("moe_rows_gu", S * 2 * n_i),
                _f32("moe_rows_hb", S, n_i), hq, hd, hs, _f32("moe_rows_ys", S, D),
                _f32("moe_rows_tmp", n_threads, S * CHUNK_ROWS), tuple(e.down.data for e in group),
                _variant(e0.gate if e0.gate_up is None else e0.gate_up), _variant(e0.down),
                np.zeros(3 * SYNC_SLOTS, np.int64), CHUNK_ROWS, *g_extras)
        if not _launch("moe_rows", kinds, args, ahead):
            return None  # only ever at the first group: the same kernel runs every group
    return out


_NONE2 = np.zeros((0, 0), np.float32)
_NONE2.flags.writeable = False  # as the families' read-only bias arrays: one Numba type for all
NO_MOE_EXTRAS = (_NONE2, _NONE2, _NONE2, np.zeros(0, np.int64), 0.0, 0.0)  # plain SwiGLU, no biases


def moe_extras(family: tuple, ids) -> tuple:
    """The fused expert blocks' extras for experts `ids` (in block order), from a family's per-layer read-only
    (gate_b (E, I), up_b (E, I), down_b (E, D), alpha, limit) (`ArchSpec.moe_extras`): the arrays themselves and
    each expert's row in them."""
    gate_b, up_b, down_b, alpha, limit = family
    return gate_b, up_b, down_b, np.ascontiguousarray(ids, dtype=np.int64), float(alpha), float(limit)


_NONE = np.zeros(0, np.float32)
_NONE.flags.writeable = False  # the model's vectors are read-only (Model.prepare): one Numba type for all
NO_EXTRAS = (_NONE, _NONE, _NONE, 0.0, _NONE, _NONE, 0)  # no biases, q/k norms, clamp, sinks or window (Mixtral)


def attention_extras(qkv_bias, q_norm, k_norm, clip, o_bias, sinks=None, window: int = 0) -> tuple:
    """The attention block's family extras; None for an absent one (the kernels take empty arrays)."""
    return (_NONE if qkv_bias is None else qkv_bias, _NONE if q_norm is None else q_norm,
            _NONE if k_norm is None else k_norm, float(clip or 0.0), _NONE if o_bias is None else o_bias,
            _NONE if sinks is None else sinks, int(window or 0))


def attention_kinds(w_qkv: QTensor, w_o: QTensor) -> tuple[Kind, Kind] | None:
    """(qkv kind, o kind) when the fused attention block can run these weights, else None."""
    return _kinds(w_qkv, w_o)


def attention_block(x: np.ndarray, norm_w: np.ndarray, eps: float, w_qkv: QTensor, w_o: QTensor,
                    n_heads: int, n_kv: int, head_dim: int, cos: np.ndarray, sin: np.ndarray,
                    k_cache: np.ndarray, v_cache: np.ndarray, pos: int, scale, kinds: tuple[Kind, Kind],
                    extras: tuple = None, ahead: dict | None = None) -> np.ndarray | None:
    """x + the attention block of one token at position `pos` (its k, v written to the caches).
    x: (D,); cos, sin: (1, d/2); k_cache, v_cache: (K, S, d) → (D,)
    extras: (qkv_bias, q_norm, k_norm, clip, o_bias, sinks, window) of the family (`attention_extras`). With `ahead`,
    None (the caches untouched) while the kernel is compiling in the background."""
    k1, k2 = kinds
    D = x.shape[0]
    xq, xd, xs = _scratch("att_x", k1.act, 1, D)
    aq, ad, as_ = _scratch("att_o", k2.act, 1, n_heads * head_dim)
    out = np.empty(D, np.float32)
    n_threads = numba.get_num_threads()
    args = (n_threads, out, x, norm_w, float(eps), w_qkv.data, xq, xd, xs, _f32("att_qkv", w_qkv.rows),
            n_heads, n_kv, cos, sin, k_cache, v_cache, pos, scale, _f32("att_att", 1, n_heads, head_dim), aq, ad, as_,
            w_o.data, _f32("att_o", D), _variant(w_qkv), _variant(w_o), _f32("att_h", 1, D),
            np.zeros(5 * SYNC_SLOTS, np.int64), CHUNK_ROWS, *(extras or NO_EXTRAS))
    return out if _launch("attention", kinds, args, ahead) else None


def attention_seqs_block(x: np.ndarray, norm_w: np.ndarray, eps: float, w_qkv: QTensor, w_o: QTensor,
                         n_heads: int, n_kv: int, head_dim: int, cos: np.ndarray, sin: np.ndarray, kv, layer: int,
                         scale, kinds: tuple[Kind, Kind], extras: tuple = None,
                         ahead: dict | None = None) -> np.ndarray | None:
    """x + the attention block of the new rows of one or several sequences (kv: attention_seqs.KVLists: rows
    kv.row0[j] .. of sequence j at positions kv.pos0[j]..; their k, v written to its cache), in one parallel
    region.   x: (T, D); cos, sin: (T, d/2) → (T, D); with `ahead`, None (the caches untouched) while the kernel
    is compiling in the background."""
    T, D = x.shape
    k1, k2 = kinds
    xq, xd, xs = _scratch("atts_x", k1.act, T, D)
    aq, ad, as_ = _scratch("atts_o", k2.act, T, n_heads * head_dim)
    out = np.empty((T, D), np.float32)
    n_threads = numba.get_num_threads()
    args = (n_threads, out, x, norm_w, float(eps), w_qkv.data, xq, xd, xs,
            _f32("atts_qkv", T, w_qkv.rows), _f32("atts_q", T, n_heads, head_dim), _f32("atts_k", T, n_kv, head_dim),
            _f32("atts_v", T, n_kv, head_dim), cos, sin, kv.k, kv.v, layer, kv.row0, kv.pos0, scale,
            _f32("atts_att", T, n_heads, head_dim), aq, ad, as_, w_o.data, _f32("atts_obuf", T, D), _variant(w_qkv),
            _variant(w_o), _f32("atts_h", T, D), _f32("atts_tmp", n_threads, T * CHUNK_ROWS),
            np.zeros(5 * SYNC_SLOTS, np.int64), CHUNK_ROWS, *(extras or NO_EXTRAS))
    return out if _launch("attention_seqs", kinds, args, ahead) else None
