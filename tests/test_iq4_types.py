"""IQ4_NL and IQ4_XS as engine weight types, against gguf-py, ggml's own C and ggml's arithmetic.

- Dequantisation bit-identical to gguf.quants (random blocks, all-zero blocks, every code, every
  6-bit IQ4_XS scale, f16 edge scales: zeros, subnormals, the largest half, inf, NaN), and on the
  output of ggml's own quantiser (`ggml_quantize_chunk` of llama-cpp-python's libggml), where ggml's
  own dequantize_row_* is a third opinion. gguf.quants has no quantiser for these types; nor does edgemoe.
- The kernels (kernels/iq4.py) against (a) the dequantised weights in float64 and (b) NumPy emulations
  of ggml's integer arithmetic: exact integer dots, then the f32 operations in a stated order.
  IQ4_NL: per block (d_x * d_w) * sumi, summed in the kernel's documented order (8 lanes, then the tail)
  bit for bit; ggml's generic C adds them block by block, within summation-order error of ours.
  IQ4_XS: ggml's AVX2 vec_dot_iq4_xs_q8_K (per super-block lane sums scaled by ls - 32, one FMA per
  lane, hsum_float_8), bit for bit. The emulations are themselves checked bit for bit against ggml's
  compiled C (ggml_vec_dot_*_generic and, on an AVX2 build, ggml_vec_dot_iq4_xs_q8_K) through ctypes.
- Batch rows bit-identical to the row alone, serial and parallel, 1 and 2 threads; the row kinds of
  `kinds.KINDS`; the fused expert block; a GGUF file holding each type through the loader to `linear`.
Every kernel test runs on each variant `dispatch.supported_variants()` offers on this CPU (it prints
which); without VNNI, the vnni kernels are still compiled for an AVX-512 CPU to check they lower.
"""

from __future__ import annotations

from fractions import Fraction

import gguf.quants as gq
import numpy as np
import pytest
import type_checks as tc
from gguf import GGMLQuantizationType as QT

from edgemoe.kernels import dispatch, kinds, matmul
from edgemoe.kernels.iq4 import matmul_iq4_nl, matmul_iq4_nl_serial, matmul_iq4_xs, matmul_iq4_xs_serial
from edgemoe.kernels.q8act import quantize_q8_0
from edgemoe.qtensor import FORMATS, QTensor, check_supported
from edgemoe.quants import dequantize
from edgemoe.quants.iq4 import KVALUES_IQ4NL

MARKERS = tc.MARKERS
BLOCK = {QT.IQ4_NL: (32, 18), QT.IQ4_XS: (256, 136)}  # (values, bytes), ggml-common.h
# f16 bit patterns of d: +-0, the smallest subnormal, the largest subnormal, the smallest normal, 1,
# +-65504, +-inf, NaN
EDGE_HALVES = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00], np.uint16)
SHAPES = {  # (rows, cols)
    QT.IQ4_NL: ((37, 96), (5, 288), (3, 608), (16, 2880)),  # 3 blocks (tail only), 8 + 1, 2 x 8 + 3, 11 x 8 + 2
    QT.IQ4_XS: ((37, 256), (5, 768), (16, 2816)),  # 1, 3 and 11 super-blocks
}
TOKENS = tc.TOKENS
TYPES = (QT.IQ4_NL, QT.IQ4_XS)
_bits_equal, _same = tc.bits_equal, tc.same
variant = tc.variant_fixture(tuple(t.name for t in TYPES))
ggml = tc.ggml_fixture()


def _halves(rng, n, lo=1e-3, hi=1e-2) -> np.ndarray:
    """(n, 2) uint8: f16 bytes of random scales of either sign."""
    d = rng.uniform(lo, hi, n) * rng.choice([-1, 1], n)
    return d.astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng, qt: QT, n_row: int, cols: int) -> np.ndarray:
    """(rows, row bytes) uint8: random codes and sub-block scales, small finite f16 d of either sign."""
    values, size = BLOCK[qt]
    raw = rng.integers(0, 256, (n_row * cols // values, size), dtype=np.uint8)
    raw[:, :2] = _halves(rng, len(raw))
    return raw.reshape(n_row, -1)


def weight(raw: np.ndarray, qt: QT) -> QTensor:
    values, size = BLOCK[qt]
    return QTensor.from_array(raw, qt, raw.shape[0], raw.shape[1] // size * values)


# ---- block format: dequantisation ----------------------------------------------------------------


def test_format_rows():
    assert FORMATS[QT.IQ4_NL] == (32, 18, "f16", (0,))
    assert FORMATS[QT.IQ4_XS] == (256, 136, "f16", (0,))
    for qt in TYPES:
        assert check_supported(int(qt), "t") == qt
        assert dispatch.kernel_names()[qt.name].startswith("int8")
        assert (qt, 1) in kinds.KINDS
    np.testing.assert_array_equal(KVALUES_IQ4NL, gq.IQ4_NL.kvalues)


def _edge_blocks(rng, qt: QT) -> np.ndarray:
    """Blocks of every kind of edge: all zeros, each f16 edge d, each code filling a block (and, for
    IQ4_XS, each 6-bit sub-block scale), then random blocks. (B, bytes) uint8."""
    values, size = BLOCK[qt]
    raw = rng.integers(0, 256, (96, size), dtype=np.uint8)
    raw[:4] = 0
    raw[4 : 4 + len(EDGE_HALVES), :2] = EDGE_HALVES.view(np.uint8).reshape(-1, 2)
    codes = (np.arange(16, dtype=np.uint8) * 0x11)[:, None]  # code c in both nibbles of every byte
    raw[20:36, -values // 2 :] = codes
    if qt == QT.IQ4_XS:  # block 40 + k: ls = 8k .. 8k + 7 in its sub-blocks; 48 + k: every ls = 63 or 0
        for k in range(8):
            ls = np.arange(8 * k, 8 * k + 8)
            raw[40 + k, 4:8] = (ls[0::2] & 15) | ((ls[1::2] & 15) << 4)
            raw[40 + k, 2:4] = np.array([np.sum((ls >> 4) << (2 * np.arange(8)))], np.uint16).view(np.uint8)
        raw[48:52, 2:8] = 0xFF
        raw[52:56, 2:8] = 0
        raw[52:56, :2] = EDGE_HALVES[[6, 8, 9, 10]].view(np.uint8).reshape(-1, 2)  # 0 * (large, inf, nan)
    return raw


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qt, ggml):
    rng = np.random.default_rng(1)
    raw = _edge_blocks(rng, qt)
    values = BLOCK[qt][0]
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, qt)
    ours = dequantize(raw, qt, values)
    assert ours.dtype == np.float32 and _bits_equal(ours, ref)
    assert not np.any(ours[:4]) and np.isnan(ours).any() and np.isinf(ours).any()
    assert _same(ggml.dequantize(qt, raw), ours)  # ggml's own C agrees too
    # whole rows of several blocks (the per-row path of `dequantize`)
    rows_raw = random_blocks(rng, qt, 6, 8 * values)
    assert _bits_equal(dequantize(rows_raw, qt, 8 * values), gq.dequantize(rows_raw, qt).reshape(6, -1))


def _weights(rng, cols: int) -> dict[str, np.ndarray]:
    g = rng.standard_normal((8, cols)).astype(np.float32)
    return {
        "gaussian": g * np.float32(0.02),
        "outliers": g * np.where(rng.random(g.shape) < 0.01, 50, 1).astype(np.float32),
        "mixed_scales": g * np.float32(10.0) ** rng.integers(-6, 4, (8, 1)).astype(np.float32),
        "zeros": np.zeros((2, cols), np.float32),
    }


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_ggml_quantiser_output(qt, ggml):
    """Blocks as llama-quantize writes them (ggml_quantize_chunk): gguf.quants, ggml's C and ours agree."""
    for name, x in _weights(np.random.default_rng(2), 1024).items():
        raw = ggml.quantize(qt, x)
        ours = dequantize(raw, qt, 1024)
        assert _bits_equal(ours, gq.dequantize(raw, qt).reshape(ours.shape)), name
        assert _bits_equal(ours, ggml.dequantize(qt, raw)), name
        if name == "gaussian":  # a sanity check of the quantiser call itself: ~4.5 bits per weight
            assert np.abs(ours - x).max() < 0.2 * np.abs(x).max()


# ---- NumPy emulations of ggml's arithmetic --------------------------------------------------------


fma32 = tc.fma32  # one f32 rounding, as vfmadd


def hsum_float_8(lanes: np.ndarray) -> np.ndarray:
    """ggml's hsum_float_8 over the last axis (8 lanes): ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    s = lanes[..., 4:] + lanes[..., :4]
    return (s[..., 0] + s[..., 2]) + (s[..., 1] + s[..., 3])


def _levels(raw: np.ndarray, n_row: int) -> np.ndarray:
    """kvalues of every weight, int64, (R, groups of 32, 32) in element order."""
    qs = raw[..., -16:] if raw.shape[-1] == 18 else raw[..., 8:].reshape(*raw.shape[:-1], 8, 16)
    return KVALUES_IQ4NL[np.concatenate([qs & 15, qs >> 4], axis=-1)].astype(np.int64).reshape(n_row, -1, 32)


def nl_terms(raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """(T, R, B) f32 terms (d_x * d_w) * sumi of ggml_vec_dot_iq4_nl_q8_0, for weights raw (R, B*18) and
    activation blocks xq (T, C) int8 (plain layout), xd (T, B) f32."""
    n_row, n_tok = raw.shape[0], xq.shape[0]
    blocks = raw.reshape(n_row, -1, 18)
    kv = _levels(blocks, n_row)  # (R, B, 32)
    sumi = np.einsum("rbj,tbj->trb", kv, xq.reshape(n_tok, -1, 32).astype(np.int64))  # exact
    dw = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (R, B)
    with np.errstate(over="ignore", invalid="ignore"):
        return (xd[:, None, :] * dw[None]) * sumi.astype(np.float32)


sum_block_order, nl_kernel_order = tc.sum_block_order, tc.sum_kernel_order


def _xs_parts(raw: np.ndarray, xq: np.ndarray):
    """Per (T, R, S): ls - 32 (R, S, 8), exact sub-block dots (T, R, S, 8) and their 8 AVX2 lane parts
    (T, R, S, 8 sub-blocks, 8 lanes: elements 4i..4i+3), d_w (R, S) f32."""
    n_row, n_tok = raw.shape[0], xq.shape[0]
    blocks = raw.reshape(n_row, -1, 136)
    n_sb = blocks.shape[1]
    sh = blocks[:, :, 2:4].copy().view(np.uint16).astype(np.int64)  # (R, S, 1)
    sl = blocks[:, :, 4:8].astype(np.int64)
    ls = (np.stack([sl & 15, sl >> 4], axis=3).reshape(n_row, n_sb, 8) | (((sh >> (2 * np.arange(8))) & 3) << 4)) - 32
    kv = _levels(blocks, n_row).reshape(n_row, n_sb, 8, 8, 4)
    x = xq.astype(np.int64).reshape(n_tok, n_sb, 8, 8, 4)
    parts = np.einsum("rsjik,tsjik->trsji", kv, x)  # exact
    dw = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
    return ls, parts, dw


def xs_avx2(raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """ggml's AVX2 ggml_vec_dot_iq4_xs_q8_K (and kernels/iq4.py): per super-block, lane i = sum_j
    (ls_j - 32) * (dot of elements 4i..4i+3 of sub-block j), exact; acc = fma(float(lane), d_w * d_x,
    acc); out = hsum_float_8(acc). (T, R) f32."""
    ls, parts, dw = _xs_parts(raw, xq)
    lanes = np.einsum("trsji,rsj->trsi", parts, ls).astype(np.float32)  # |lane| < 2**24: exact
    acc = np.zeros((xq.shape[0], raw.shape[0], 8), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(dw.shape[1]):
            d = (dw[None, :, s] * xd[:, None, s])[..., None]  # (T, R, 1) f32, one rounding as the C
            acc = fma32(lanes[:, :, s], d, acc)
        return hsum_float_8(acc)


def xs_generic(raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_iq4_xs_q8_K_generic: d4d8 = d_w * d_x; per sub-block in order,
    sumf += (d4d8 * (ls - 32)) * sumi in f32. (T, R) f32."""
    ls, parts, dw = _xs_parts(raw, xq)
    sumi = parts.sum(axis=4).astype(np.float32)  # (T, R, S, 8) exact
    acc = np.zeros(sumi.shape[:2], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(dw.shape[1]):
            d4d8 = dw[None, :, s] * xd[:, None, s]
            for j in range(8):
                acc = acc + (d4d8 * ls[:, s, j].astype(np.float32)) * sumi[:, :, s, j]
    return acc


ggml_q8_0, engine_q8_k, pair_layout = tc.ggml_q8_0, tc.engine_q8_k, tc.pair_layout


def ggml_q8_k(raw: np.ndarray, n_tok: int) -> tuple[np.ndarray, np.ndarray]:
    """block_q8_K rows (T, S * 292) -> qs (T, C) int8, d (T, S) f32."""
    return tc.unpack_q8_k(raw, n_tok)[:2]


def engine_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The engine's Q8_0 activation blocks (q8act), plain layout: xq (T, C), xd (T, B) f32."""
    return tc.engine_q8_0(x)[:2]


def emulate(qt: QT, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the engine's matmul must give for x (T, C): the emulation on the engine's own activation blocks."""
    if qt == QT.IQ4_NL:
        xq, xd = engine_q8_0(x)
        return nl_kernel_order(nl_terms(raw, xq, xd))
    xq, xd, _ = engine_q8_k(x)
    return xs_avx2(raw, xq, xd)


def test_fma32_is_one_rounding():
    """The fma emulation against exact rational arithmetic, on random triples and on sums that f64 rounds
    onto an f32 midpoint (where a plain f64 sum would round twice)."""
    rng = np.random.default_rng(3)
    a = rng.integers(-(2**24), 2**24, 400).astype(np.float32)
    b = (rng.standard_normal(400) * 10.0 ** rng.integers(-8, 3, 400)).astype(np.float32)
    c = (rng.standard_normal(400) * 10.0 ** rng.integers(-2, 12, 400)).astype(np.float32)
    # Sums f64 rounds onto an f32 midpoint: a * b = 2**-24 (half an ulp of 1) + e * 2**-71, |e| < 2**18
    # (below half an f64 ulp). Above the midpoint of 1 and its successor, then below that of 1 + 2**-23
    # (odd) and its successor: a double rounding (ties to even) gets both wrong.
    a[:2] = [8390625, 8388609]  # products 2**47 + 254047 and 2**47 - 2, times 2**-71
    b[:2] = [16773183 * 2.0**-71, 16777214 * 2.0**-71]
    c[:2] = [1, 1 + 2.0**-23]

    def exact(x, y, z):
        v = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        lo = np.float32(float(v))  # a neighbour; correct it to the nearest f32, ties to even
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        dist = [abs(Fraction(float(f)) - v) for f in cands]
        best = min(dist)
        ties = [f for f, e in zip(cands, dist) if e == best]
        return min(ties, key=lambda f: int(np.array(f).view(np.uint32)) & 1)

    want = np.array([exact(*t) for t in zip(a, b, c)], np.float32)
    assert _bits_equal(fma32(a, b, c), want)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert not _bits_equal(naive[:2], want[:2])  # the midpoint cases do catch double rounding


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_emulations_match_ggml_c(qt, ggml):
    """The emulations give the bits of ggml's compiled C on ggml's own activation blocks: the generic
    loops bit for bit; ggml's AVX2 IQ4_XS kernel bit for bit (when the library was built with AVX2)."""
    rng = np.random.default_rng(4)
    cols = 2880 if qt == QT.IQ4_NL else 2816
    raw = ggml.quantize(qt, rng.standard_normal((6, cols)).astype(np.float32) * np.float32(0.02))
    x = rng.standard_normal((3, cols)).astype(np.float32)
    if qt == QT.IQ4_NL:
        act, xq, xd = ggml_q8_0(x)
        terms = nl_terms(raw, xq, xd)
        assert _bits_equal(ggml.vec_dot(qt, raw, act, generic=True), sum_block_order(terms))
        arch = ggml.vec_dot(qt, raw, act)  # 2 x 8 lanes of FMAs on AVX2: summation order only
        assert np.all(np.abs(arch.astype(np.float64) - sum_block_order(terms)) <= tc.order_bound(terms))
    else:
        act = ggml.quantize_q8(QT.Q8_K, x, ref=True)
        xq, xd = ggml_q8_k(act, 3)
        assert _bits_equal(ggml.vec_dot(qt, raw, act, generic=True), xs_generic(raw, xq, xd))
        if not ggml.avx2:
            pytest.skip("libggml-cpu was built without AVX2: its IQ4_XS kernel is the generic one")
        assert _bits_equal(ggml.vec_dot(qt, raw, act), xs_avx2(raw, xq, xd))


def test_activations_are_ggml_blocks(ggml):
    """The engine's activation blocks are ggml's: Q8_0 (its f32 scale rounds to ggml's f16) and Q8_K
    (quantize_row_q8_K_ref, bit for bit, with the per-16 sums)."""
    x = np.random.default_rng(5).standard_normal((3, 2816)).astype(np.float32)
    x[1, :256] = 0
    xq, xd = engine_q8_0(x)
    _, gq_q, gq_d = ggml_q8_0(x)
    np.testing.assert_array_equal(xq, gq_q)
    np.testing.assert_array_equal(xd.astype(np.float16).astype(np.float32), gq_d)
    xp = np.empty_like(xq)
    quantize_q8_0(xp, np.empty_like(xd), np.empty_like(xd), x, 1)
    np.testing.assert_array_equal(xp, pair_layout(xq))
    kq, kd, kb = engine_q8_k(x)
    raw = ggml.quantize_q8(QT.Q8_K, x, ref=True).reshape(3, -1, 292)
    q, d = ggml_q8_k(raw, 3)
    np.testing.assert_array_equal(kq, q)
    assert _bits_equal(kd, d)
    np.testing.assert_array_equal(kb, raw[:, :, 260:].copy().view(np.int16).reshape(3, -1))


# ---- kernel tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantised_and_ggml(qt, variant, monkeypatch):
    rng = np.random.default_rng(11)
    try:
        for n_row, cols in SHAPES[qt]:
            raw = random_blocks(rng, qt, n_row, cols)
            w, wd = weight(raw, qt), gq.dequantize(raw, qt).reshape(n_row, cols).astype(np.float64)  # (R, C)
            x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)  # (T, C)
            single = tc.rows_alone(monkeypatch, w, x)  # (T, R) token by token
            # (a) the dequantised weights in float64: error of rounding x to int8 (1/254 of a block's max)
            assert tc.relative_error(single, x, wd).max() < 1e-2, (n_row, cols)
            # (b) ggml's arithmetic on the same activation blocks, in the kernel's order
            assert _bits_equal(single, emulate(qt, raw, x)), (n_row, cols)
            if qt == QT.IQ4_NL:  # and ggml's generic order, within its summation error
                terms = nl_terms(raw, *engine_q8_0(x))
                bound = tc.order_bound(terms)
                assert np.all(np.abs(single.astype(np.float64) - sum_block_order(terms)) <= bound), (n_row, cols)
            # batch rows bit-identical to the row alone: serial and parallel twins, 1 and 2 threads
            tc.check_batch_rows(monkeypatch, w, x, single, f"{n_row}x{cols}")
    finally:
        tc.reset_threads()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_kernel_on_ggml_blocks_at_the_edges(qt, variant, ggml):
    """ggml's own activation blocks into the raw kernels, weights with every f16 edge scale (subnormals,
    65504, inf, NaN: overflow and inf - inf), all-zero blocks and every IQ4_XS sub-block scale: the
    emulation's bits, NaN where it has NaN."""
    rng = np.random.default_rng(12)
    marker = MARKERS[variant]
    values, size = BLOCK[qt]
    for n_row, cols in ((24, 352 if qt == QT.IQ4_NL else 512), (9, 2880 if qt == QT.IQ4_NL else 2816)):
        raw = random_blocks(rng, qt, n_row, cols).reshape(n_row, -1, size)
        for r in range(4, n_row):  # one edge scale per row, in a block that moves along
            raw[r, r % raw.shape[1], :2] = EDGE_HALVES[r % len(EDGE_HALVES) : r % len(EDGE_HALVES) + 1].view(np.uint8)
        raw[0] = 0
        raw[1, :, :2] = EDGE_HALVES[6:7].view(np.uint8)  # 65504 everywhere
        raw[2, :, :2] = np.array([0x3C00], np.uint16).view(np.uint8)
        raw[2, :, -values // 2 :] = 0xFF  # code 15 (113) everywhere: with token 3, + inf
        if qt == QT.IQ4_XS:
            raw[2, :, 2:8] = 0xFF  # ls = 63 (scale 31), the largest
            raw[3, :, 2:8] = 0  # ls = 0 (scale -32), the most negative
        raw = raw.reshape(n_row, -1)
        raw.setflags(write=False)  # as QTensor holds weights: the same compiled kernels as matmul's
        x = rng.standard_normal((5, cols), dtype=np.float32) * np.float32(4)
        x[1, :256] = 0
        x[2, ::3] = np.float32(1e34)  # +-127 activations; scales near f32 max (ggml's f16 Q8_0 one: inf)
        x[3] = np.float32(1e34)  # all 127
        if qt == QT.IQ4_NL:
            with np.errstate(over="ignore"):
                _, xq, xd = ggml_q8_0(x)
            want = nl_kernel_order(nl_terms(raw, xq, xd))
            args, kernels = (pair_layout(xq), xd, np.zeros_like(xd)), (matmul_iq4_nl_serial, matmul_iq4_nl)
        else:
            xq, xd = ggml_q8_k(ggml.quantize_q8(QT.Q8_K, x, ref=True), 5)
            want = xs_avx2(raw, xq, xd)
            args, kernels = (xq, xd, np.zeros((5, cols // 16), np.int32)), (matmul_iq4_xs_serial, matmul_iq4_xs)
        for kernel in kernels:
            out = np.full((5, n_row), -1.0, np.float32)
            kernel(out, raw, *args, marker)
            assert _same(out, want), kernel
        assert np.isnan(want).any() and np.isinf(want).any()
        assert want[3, 2] == np.inf
        assert not np.any(want[[0, 1, 4], 0])  # all-zero weights (tokens 2, 3 may have inf scales: 0 * inf)


def test_iq4_xs_equals_ggml_library(variant, ggml):
    """The engine's IQ4_XS matmul has the bits of llama.cpp's own: ggml_vec_dot_iq4_xs_q8_K on
    quantize_row_q8_K_ref activations, on weights from ggml's quantiser."""
    if not ggml.avx2:
        pytest.skip("libggml-cpu was built without AVX2")
    rng = np.random.default_rng(13)
    raw = ggml.quantize(QT.IQ4_XS, rng.standard_normal((40, 2816)).astype(np.float32) * np.float32(0.02))
    x = rng.standard_normal((6, 2816)).astype(np.float32)
    out = np.empty((6, 40), np.float32)
    matmul(out, weight(raw, QT.IQ4_XS), x)
    assert _bits_equal(out, ggml.vec_dot(QT.IQ4_XS, raw, ggml.quantize_q8(QT.Q8_K, x, ref=True)))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_weights_quantised_by_ggml(qt, variant, ggml):
    """Weights from ggml's quantiser (real scale choices) through the public matmul, against the
    emulation and the float64 product, and against llama.cpp's own vec_dot within summation error."""
    rng = np.random.default_rng(14)
    cols = 2880 if qt == QT.IQ4_NL else 2816
    raw = ggml.quantize(qt, rng.standard_normal((40, cols)).astype(np.float32) * np.float32(0.02))
    x = rng.standard_normal((6, cols)).astype(np.float32)
    out = np.empty((6, 40), np.float32)
    matmul(out, weight(raw, qt), x)
    assert _bits_equal(out, emulate(qt, raw, x))
    wd = gq.dequantize(raw, qt).reshape(40, cols).astype(np.float64)
    xf = x.astype(np.float64)
    assert (np.abs(out - xf @ wd.T) / (np.abs(xf) @ np.abs(wd).T)).max() < 1e-2
    if qt == QT.IQ4_NL:  # ggml on its f16-scaled Q8_0 blocks: the same integer dots, scales within 2**-11
        act, _, _ = ggml_q8_0(x)
        ref = ggml.vec_dot(qt, raw, act)
        assert (np.abs(out - ref) / (np.abs(xf) @ np.abs(wd).T)).max() < 2e-3


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_row_kinds(qt, variant):
    """kinds.KINDS: the quantiser and row-range kernel give each row matvec's bits."""
    rng = np.random.default_rng(15)
    n_row, cols = 24, 512
    raw = random_blocks(rng, qt, n_row, cols)
    w = weight(raw, qt)
    kind = kinds.KINDS[(qt, 1)]
    x = rng.standard_normal((1, cols), dtype=np.float32)
    xq, xd, xs = dispatch.activations(kind.act, 1, cols)
    kind.quant(xq, xd, xs, x)
    tc.check_row_ranges(kind, w, x[0], (xq, xd, xs), ((0, 5), (5, 17), (17, 24)), dispatch.variant_marker(qt))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_fused_expert_block(qt, variant):
    """IQ4 experts run in the fused one-token expert block, with the bits of the separate kernels."""
    from edgemoe.experts.store import Expert

    rng = np.random.default_rng(16)
    D, n_i, A = 256, 512, 3
    experts = [Expert(*(weight(random_blocks(rng, qt, r, c), qt) for r, c in ((n_i, D), (n_i, D), (D, n_i))))
               for _ in range(A)]
    kinds = tc.moe_kinds(experts)
    assert kinds is not None and kinds[0].name == kinds[1].name == qt.name
    tc.check_fused_block(rng, experts, kinds)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_gguf_file_to_linear(qt, tmp_path):
    """A GGUF holding a 2-D tensor of the type passes check_supported and to_qtensor; linear gives the product."""
    rng = np.random.default_rng(17)
    n_row, cols = 24, 2816 if qt == QT.IQ4_XS else 2880
    raw = random_blocks(rng, qt, n_row, cols)
    (t,) = tc.write_gguf(tmp_path / f"{qt.name}.gguf", {"blk.0.ffn_down.weight": (raw, qt)})
    w = tc.loaded(t, qt, raw, cols)
    wd = dequantize(w.data, qt, cols).astype(np.float64)
    tc.check_linear(rng, w, lambda x: emulate(qt, raw, x), wd)


# Compiles (never runs) the VNNI kernels for an AVX-512 CPU, as test_kernels does for Q4_0 and Q6_K.
_VNNI_COMPILE = tc.compile_script(
    "iq4", [("matmul_iq4_nl_serial", tc.kernel_sig("float32")), ("matmul_iq4_xs_serial", tc.kernel_sig("int32"))]
)


@tc.x86_only
def test_vnni_kernels_compile_for_avx512(tmp_path):
    tc.compile_for_zen4(tmp_path, _VNNI_COMPILE)
