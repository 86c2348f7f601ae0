"""Q4_1, Q5_0 and Q5_1 (the 32-value fallback types of llama.cpp's quantiser) against gguf-py and ggml.

- Dequantisation bit-identical to gguf.quants (random bytes, so every f16 d and m including subnormals,
  inf and NaN; all-zero blocks; chosen edge scales), and the quantisers bit-identical to
  gguf.quants.quantize (random, all-zero, constant, outlier, tie and overflowing data).
- The kernel (kernels/q451.py) against (a) the dequantised weights in float64, and (b) a NumPy
  emulation of ggml_vec_dot_q4_1_q8_1 / q5_0_q8_0 / q5_1_q8_1 written from ggml-cpu/quants.c's generic
  C: per block the exact integer dot `sumi`, then one f32 term (d_w * d_x) * sumi, or for Q4_1 / Q5_1
  fma(d_w * d_x, sumi, m_w * s_x) as compilers contract the C. The emulation is itself checked bit for
  bit against ggml's compiled C (libggml-cpu of llama-cpp-python, when installed). The
  terms are summed in the kernel's documented order (8 lanes, then the tail), which the emulation
  reproduces bit for bit; ggml's generic C adds them in block order, which differs only by float
  summation order, so that comparison uses the bound of that error.
- Batch rows bit-identical to the row alone, serial and parallel, 1 and 2 threads; the row-range kinds
  and the fused expert block; a GGUF file holding each type through the loader's path to `linear`.
Every kernel test runs on each variant `dispatch.supported_variants()` offers on this CPU (it prints
which); without VNNI, the vnni kernel is still compiled for an AVX-512 CPU to check it lowers.
"""

from __future__ import annotations

import ggml_lib
import gguf.quants as gq
import numpy as np
import pytest
import type_checks as tc
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from edgemoe.kernels import dispatch, kernel_names, kinds, matmul
from edgemoe.kernels.q8act import quantize_q8_0, quantize_q8_0_sums
from edgemoe.kernels.q451 import FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, matmul_q451, matmul_q451_serial
from edgemoe.qtensor import FORMATS, QTensor, check_supported
from edgemoe.quants import dequantize, quantize

TYPES = (QT.Q4_1, QT.Q5_0, QT.Q5_1)
FMT = {QT.Q4_1: FMT_Q4_1, QT.Q5_0: FMT_Q5_0, QT.Q5_1: FMT_Q5_1}
VARIANTS, MARKERS = tc.VARIANTS, tc.MARKERS
# f16 bit patterns: +-0, the smallest subnormal, the largest subnormal, the smallest normal, 1, the
# largest finite, +-inf, NaN
EDGE_HALVES = (0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00)
# (rows, cols): 3 blocks (a pair, an odd one), 8 + 1, 2 x 8 + 3, the 1408-wide experts (5 x 8 + 4)
SHAPES = ((37, 96), (5, 288), (3, 608), (16, 1408))
TOKENS = tc.TOKENS
_bits_equal = tc.bits_equal
variant = tc.variant_fixture(tuple(t.name for t in TYPES))


def _block_bytes(qt: QT) -> int:
    return GGML_QUANT_SIZES[qt][1]


def _has_min(qt: QT) -> bool:
    return qt != QT.Q5_0


def random_blocks(rng, qt: QT, n_rows: int, cols: int) -> np.ndarray:
    """(rows, cols / 32 * S) uint8: random quants and fifth bits, d (and m) small finite f16 values."""
    nb, size = cols // 32, _block_bytes(qt)
    raw = rng.integers(0, 256, (n_rows, nb, size), dtype=np.uint8)
    raw[:, :, 0:2] = (
        (rng.uniform(1e-3, 2e-2, (n_rows, nb)) * rng.choice([-1, 1], (n_rows, nb)))
        .astype(np.float16)
        .view(np.uint8)
        .reshape(n_rows, nb, 2)
    )
    if _has_min(qt):
        raw[:, :, 2:4] = rng.uniform(-0.2, 0.2, (n_rows, nb)).astype(np.float16).view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, -1)


def weight(raw: np.ndarray, qt: QT) -> QTensor:
    return QTensor.from_array(raw, qt, raw.shape[0], raw.shape[1] // _block_bytes(qt) * 32)


# ---- block format: dequantisation and quantisation ----------------------------------------------


def test_format_rows():
    assert FORMATS[QT.Q4_1] == (32, 20, "f16", (0, 2))
    assert FORMATS[QT.Q5_0] == (32, 22, "f16", (0,))
    assert FORMATS[QT.Q5_1] == (32, 24, "f16", (0, 2))
    for qt in TYPES:
        assert check_supported(int(qt), "t") == qt
        assert qt.name in rows_kind_names() and qt.name in kernel_names()


def rows_kind_names() -> set[str]:
    return {k.name for k in kinds.KINDS.values()}


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qt):
    rng = np.random.default_rng(int(qt))
    size = _block_bytes(qt)
    raw = rng.integers(0, 256, (8, 64 * size), dtype=np.uint8)  # every f16 pattern class, every quant
    raw[7] = 0  # all-zero blocks
    blocks = raw.reshape(-1, size)
    n = len(EDGE_HALVES)
    blocks[64 : 64 + n, 0:2] = np.array(EDGE_HALVES, np.uint16).view(np.uint8).reshape(n, 2)  # edge d
    if _has_min(qt):  # edge m, with d edge and ordinary
        blocks[64 : 64 + n, 2:4] = np.array(EDGE_HALVES[::-1], np.uint16).view(np.uint8).reshape(n, 2)
        blocks[96 : 96 + n, 2:4] = np.array(EDGE_HALVES, np.uint16).view(np.uint8).reshape(n, 2)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, qt)
    ours = dequantize(raw, qt, 64 * 32)
    assert ours.dtype == np.float32 and _bits_equal(ours, ref)
    assert np.isnan(ours).any() and np.isinf(ours).any()
    assert not np.any(ours[7])


def _quantize_cases(rng) -> dict[str, np.ndarray]:
    g = rng.standard_normal((8, 512)).astype(np.float32)
    ties = np.tile(np.array([3.0, -3.0, 1.5, -1.5, 0.75, 2.25, -0.375, 0.0], np.float32), (2, 64))
    steps = np.tile(np.arange(32, dtype=np.float32) * np.float32(0.25) + np.float32(0.125), (2, 16))
    return {
        "gaussian": g,
        "zeros": np.zeros((2, 512), np.float32),
        "constant": np.full((2, 512), -1.75, np.float32),  # max == min: d = 0
        "mixed_scales": g * np.float32(10.0) ** rng.integers(-30, 30, (8, 1)).astype(np.float32),
        "outliers": g * np.where(rng.random(g.shape) < 0.01, 1e4, 1).astype(np.float32),
        "ties": ties,  # equal magnitudes of both signs (the first wins), values halfway between levels
        "steps": steps,  # x - min lands on k + 1/2 steps
        "huge": np.clip(g, -3, 3) * np.float32(1e38),  # max - min overflows to inf
        "tiny": g * np.float32(1e-42),  # subnormal inputs, d flushes to an f16 zero
    }


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_quantize_matches_gguf(qt):
    for name, x in _quantize_cases(np.random.default_rng(7)).items():
        with np.errstate(all="ignore"):
            ref = np.asarray(gq.quantize(x, qt)).view(np.uint8)
            ours = quantize(x, qt)
            assert ours.shape == ref.shape and np.array_equal(ours, ref), name
            assert _bits_equal(dequantize(ours, qt, x.shape[1]), gq.dequantize(ref, qt)), name


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_exact_values_round_trip(qt):
    """Values on a block's own grid (power-of-two d, f16 m, every level used) quantise back to themselves."""
    rng = np.random.default_rng(8)
    levels = 16 if qt == QT.Q4_1 else 32
    q = np.stack([rng.permutation(32) % levels for _ in range(64)]).astype(np.float32)  # (64, 32) every level
    d = np.float32(2.0) ** rng.integers(-8, 2, (64, 1)).astype(np.float32)
    if qt == QT.Q5_0:
        q[:, 0] = 0  # the largest magnitude is -16 d: the scale comes out as d
        x = d * (q - 16)
    else:  # m a multiple of 2**-6: max - min = (levels - 1) d exactly
        x = d * q + rng.integers(-64, 64, (64, 1)).astype(np.float32) / np.float32(64)
    x = x.reshape(2, -1).astype(np.float32)
    assert _bits_equal(dequantize(quantize(x, qt), qt, x.shape[1]), x)


# ---- NumPy emulation of ggml's integer dots (ggml-cpu/quants.c, generic C) ----------------------


def ggml_values(raw: np.ndarray, qt: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The loop bodies of ggml_vec_dot_{q4_1_q8_1, q5_0_q8_0, q5_1_q8_1}_generic on weights raw (R, B*S):
    (x (R, B, 32) int64 the integers multiplied with y.qs, d (R, B) f32, m (R, B) f32 or None)."""
    n_row = raw.shape[0]
    blocks = raw.reshape(n_row, -1, _block_bytes(qt)).astype(np.int64)
    qs = blocks[..., -16:]  # (R, B, 16)
    d = raw.reshape(n_row, -1, _block_bytes(qt))[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = None
    if _has_min(qt):
        m = raw.reshape(n_row, -1, _block_bytes(qt))[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    v0, v1 = qs & 0x0F, qs >> 4  # values j and j + 16
    if qt != QT.Q4_1:
        o = 2 if qt == QT.Q5_0 else 4
        qh = blocks[..., o] | blocks[..., o + 1] << 8 | blocks[..., o + 2] << 16 | blocks[..., o + 3] << 24  # (R, B)
        j = np.arange(16)
        if qt == QT.Q5_0:
            xh_0 = ((qh[..., None] & (1 << (j + 0))) >> (j + 0)) << 4
            xh_1 = (qh[..., None] & (1 << (j + 16))) >> (j + 12)
            v0, v1 = ((v0 | xh_0) - 16).astype(np.int8), ((v1 | xh_1) - 16).astype(np.int8)  # (int8_t)(... - 16)
        else:
            xh_0 = ((qh[..., None] >> (j + 0)) << 4) & 0x10
            xh_1 = (qh[..., None] >> (j + 12)) & 0x10
            v0, v1 = v0 | xh_0, v1 | xh_1
    return np.concatenate([v0, v1], axis=-1).astype(np.int64), d, m


fma32 = tc.fma32  # one f32 rounding, as vfmadd


def ggml_terms(raw: np.ndarray, qt: QT, yq: np.ndarray, yd: np.ndarray, ys: np.ndarray | None) -> np.ndarray:
    """(T, R, B) f32 terms of ggml's loop for activation blocks yq (T, C) int8, yd (T, B) f32 and, for
    the q8_1 partners of Q4_1 / Q5_1, ys (T, B) f32 = d * sum: (d_w * d_x) * sumi, or
    fma(d_w * d_x, sumi, m_w * s_x), the contraction compilers make of `(d_w * d_x) * sumi + m_w * s_x`
    (libggml-cpu's build has these bits, see test_against_ggml_compiled)."""
    x, d, m = ggml_values(raw, qt)
    n_tok, nb = yq.shape[0], x.shape[1]
    sumi = np.einsum("rbj,tbj->trb", x, yq.reshape(n_tok, nb, 32).astype(np.int64))  # (T, R, B) exact
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        dd = d[None] * yd[:, None, :]  # (T, R, B) one rounding, as the C
        if m is None:
            return dd * sumi.astype(np.float32)
        return fma32(dd, sumi.astype(np.float32), m[None] * ys[:, None, :])


sum_block_order, sum_kernel_order, kernel_layout = tc.sum_block_order, tc.sum_kernel_order, tc.kernel_layout


def ggml_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's own activation blocks: qs (T, C) int8 and d (T, B) by gguf-py's Q8_0 quantiser (f16 values),
    and quantize_row_q8_1_ref's s = f16(sum * d) with d = amax / 127 unrounded (ggml-quants.c)."""
    _, qs, d = tc.ggml_q8_0(x)
    d32 = np.abs(x.reshape(x.shape[0], -1, 32)).max(axis=2) / np.float32(127)
    s = (qs.reshape(x.shape[0], -1, 32).sum(axis=2).astype(np.float32) * d32).astype(np.float16).astype(np.float32)
    return qs, d, s


engine_q8 = tc.engine_q8_0


def expected(raw: np.ndarray, qt: QT, x: np.ndarray) -> np.ndarray:
    """The kernel's bits for x (T, C), by the emulation on the engine's activation blocks."""
    xq, xd, xs = engine_q8(x)
    return sum_kernel_order(ggml_terms(raw, qt, xq, xd, xs))


# ---- kernel tests --------------------------------------------------------------------------------


def test_activations_are_ggml_q8():
    """The engine's activation blocks hold ggml's int8 values, its d before the f16 rounding and
    s = d * sum (q8_1's s before its f16 rounding), in the pair layout the kernel reads."""
    x = np.random.default_rng(3).standard_normal((3, 1408), dtype=np.float32)
    x[1, :32] = 0
    xq, xd, xs = engine_q8(x)
    gq_q, gq_d, gq_s = ggml_q8(x)
    np.testing.assert_array_equal(xq, gq_q)
    np.testing.assert_array_equal(xd.astype(np.float16).astype(np.float32), gq_d)
    sums = xq.reshape(3, -1, 32).sum(axis=2).astype(np.float32)
    assert _bits_equal(xs, sums * xd)
    np.testing.assert_array_equal(xs.astype(np.float16).astype(np.float32), gq_s)
    for cols in (1408, 1408 - 32):  # an even and an odd number of blocks (the last one stays plain)
        xc = np.ascontiguousarray(x[:, :cols])
        want_q, want_s = kernel_layout(xq[:, :cols].copy())
        xp, d2, s2 = np.empty((3, cols), np.int8), np.empty((3, cols // 32), np.float32), np.empty((3, cols // 32), np.float32)
        quantize_q8_0(xp, d2, s2, xc, 1)  # Q4_1, Q5_1
        np.testing.assert_array_equal(xp, want_q)
        assert _bits_equal(d2, xd[:, : cols // 32]) and _bits_equal(s2, xs[:, : cols // 32])
        xp, d2, i2 = np.empty((3, cols), np.int8), np.empty((3, cols // 32), np.float32), np.empty((3, cols // 32), np.int32)
        quantize_q8_0_sums(xp, d2, i2, xc)  # Q5_0
        np.testing.assert_array_equal(xp, want_q)
        np.testing.assert_array_equal(i2, want_s)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantised_and_ggml(qt, variant, monkeypatch):
    rng = np.random.default_rng(11 + int(qt))
    try:
        for n_row, cols in SHAPES:
            raw = random_blocks(rng, qt, n_row, cols)
            w, wd = weight(raw, qt), gq.dequantize(raw, qt).astype(np.float64)  # (R, C)
            x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)  # (T, C)
            single = tc.rows_alone(monkeypatch, w, x)  # (T, R) token by token
            # (a) the dequantised weights in float64: error of rounding x to int8 (1/254 of a block's max)
            assert tc.relative_error(single, x, wd).max() < 1e-2, (n_row, cols)
            # (b) ggml's arithmetic on the same activation blocks, in the kernel's summation order
            xq, xd, xs = engine_q8(x)
            terms = ggml_terms(raw, qt, xq, xd, xs)
            assert _bits_equal(single, sum_kernel_order(terms)), (n_row, cols)
            ggml = sum_block_order(terms)  # the generic C's order: within its summation error
            assert np.all(np.abs(single.astype(np.float64) - ggml) <= tc.order_bound(terms)), (n_row, cols)
            # batch rows bit-identical to the row alone: serial and parallel twins, 1 and 2 threads
            tc.check_batch_rows(monkeypatch, w, x, single, f"{n_row}x{cols}")
    finally:
        tc.reset_threads()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_kernel_on_ggml_blocks_at_the_edges(qt, variant):
    """ggml's own activation blocks (f16 d, and q8_1's f16 s) into the raw kernels, weights with edge d
    and m (subnormals, the largest finite, inf, NaN) and all-zero blocks: the emulation's bits, NaN
    where it has NaN."""
    rng = np.random.default_rng(12)
    marker, size = MARKERS[variant], _block_bytes(qt)
    for n_row, cols in ((24, 352), (9, 1408)):
        raw = random_blocks(rng, qt, n_row, cols).reshape(n_row, -1, size)
        n = len(EDGE_HALVES)
        edges = np.array(EDGE_HALVES, np.uint16).view(np.uint8).reshape(n, 2)
        third = n_row // 3
        raw[1:third, :n, 0:2] = edges  # edge d, ordinary m; the last third stays ordinary
        if _has_min(qt):
            raw[third : 2 * third, :n, 2:4] = edges  # ordinary d, edge m
        raw[0] = 0
        raw = raw.reshape(n_row, -1)
        raw.setflags(write=False)  # as QTensor holds weights: the same compiled kernels as matmul's
        x = rng.standard_normal((5, cols), dtype=np.float32) * np.float32(4)
        x[1, :64] = 0
        yq, yd, ys = ggml_q8(x)
        want = sum_kernel_order(ggml_terms(raw, qt, yq, yd, ys))
        xp, sums = kernel_layout(yq)
        xs = sums if qt == QT.Q5_0 else ys
        for kernel in (matmul_q451_serial, matmul_q451):
            out = np.full((5, n_row), -1.0, np.float32)
            kernel(out, raw, xp, yd, xs, FMT[qt], marker)
            nan = np.isnan(want)
            np.testing.assert_array_equal(np.isnan(out), nan)
            assert _bits_equal(np.where(nan, 0, out), np.where(nan, 0, want))
        assert nan.any() and not np.any(want[:, 0]) and np.isfinite(want[:, 2 * third :]).all()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_weights_quantised_by_gguf(qt, variant):
    """Weights from gguf.quants.quantize (real d and m choices) through the public matmul."""
    rng = np.random.default_rng(13)
    n_row, cols = 40, 1408
    raw = np.asarray(gq.quantize(rng.standard_normal((n_row, cols), dtype=np.float32) * 0.02, qt)).view(np.uint8)
    x = rng.standard_normal((6, cols), dtype=np.float32)
    out = np.empty((6, n_row), np.float32)
    matmul(out, weight(raw, qt), x)
    assert _bits_equal(out, expected(raw, qt, x))
    wd = gq.dequantize(raw, qt).astype(np.float64)
    assert tc.relative_error(out, x, wd).max() < 1e-2


def test_row_ranges_and_fused_expert_block(variant):
    """kinds.KINDS gives each row range the bits of matvec; the fused one-token expert block runs experts
    of these types (Q4_1 gate/up, Q5_0 or Q5_1 down, as llama.cpp's mixes do) with the separate kernels' bits."""
    from edgemoe.experts.store import Expert

    rng = np.random.default_rng(14)
    for qt in TYPES:
        raw = random_blocks(rng, qt, 24, 1408)
        w, x = weight(raw, qt), rng.standard_normal(1408, dtype=np.float32)
        kind = kinds.kind_of(w)
        assert kind is not None and kind.name == qt.name
        xq, xd, xs = (a[:1] for a in dispatch._scratch(kind.act, 1, 1408))
        kind.quant(xq, xd, xs, x[None])
        tc.check_row_ranges(kind, w, x, (xq, xd, xs), ((0, 5), (5, 6), (6, 24)), dispatch.variant_marker(qt), qt.name)

    D, n_i, A = 64, 1408, 3
    for up_type, down_type in ((QT.Q4_1, QT.Q5_0), (QT.Q5_1, QT.Q5_1)):

        def make(qt, r, c):
            return weight(random_blocks(rng, qt, r, c), qt)

        experts = [Expert(make(up_type, n_i, D), make(up_type, n_i, D), make(down_type, D, n_i)) for _ in range(A)]
        pair = tc.moe_kinds(experts)
        assert pair is not None and (pair[0].name, pair[1].name) == (up_type.name, down_type.name)
        tc.check_fused_block(rng, experts, pair)


def test_gguf_file_to_linear(tmp_path):
    """A GGUF holding a 2-D tensor of each type passes check_supported and to_qtensor; linear gives the
    emulation's product."""
    rng = np.random.default_rng(15)
    n_row, cols = 24, 1408
    raws = {
        qt: np.asarray(gq.quantize(rng.standard_normal((n_row, cols), dtype=np.float32), qt)).view(np.uint8) for qt in TYPES
    }
    names = {f"blk.{i}.ffn_down.weight": (raw, qt) for i, (qt, raw) in enumerate(raws.items())}
    tensors = tc.write_gguf(tmp_path / "legacy.gguf", names)
    assert [t.tensor_type for t in tensors] == list(TYPES)
    for t, (qt, raw) in zip(tensors, raws.items()):
        w = tc.loaded(t, qt, raw, cols)
        wd = dequantize(w.data, qt, cols).astype(np.float64)
        tc.check_linear(rng, w, lambda x, raw=raw, qt=qt: expected(raw, qt, x), wd, what=qt.name)


ggml = tc.ggml_fixture()


_Y_SIZE = {QT.Q4_1: 36, QT.Q5_0: 34, QT.Q5_1: 36}  # bytes of ggml's block_q8_1 / block_q8_0 activation blocks


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_against_ggml_compiled(qt, ggml):
    """ggml's own compiled C (libggml-cpu of llama-cpp-python) as the oracle: its activation quantiser
    (quantize_row_q8_0 / q8_1) and ggml_vec_dot_*_generic for every (token, row). The emulation's
    block-order sum has the generic C's bits; the kernel, fed the same C activation blocks, is within
    summation-order error of the generic C and of ggml's own SIMD dot (this library's build)."""
    y_size = _Y_SIZE[qt]
    rng = np.random.default_rng(16)
    n_row, cols, n_tok = 12, 1408, 3
    raw = np.asarray(gq.quantize(rng.standard_normal((n_row, cols), dtype=np.float32) * 0.05, qt)).view(np.uint8)
    raw = np.ascontiguousarray(raw)
    x = rng.standard_normal((n_tok, cols), dtype=np.float32)
    # ggml's block_q8_0 / block_q8_1 rows, from libggml-cpu's quantize_row_q8_0 / q8_1
    y = ggml.quantize_q8(ggml_lib.VEC_DOT_TYPE[qt], x).reshape(n_tok, cols // 32, y_size)
    yd = y[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (T, B)
    ys = y[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if y_size == 36 else None
    yq = y[..., y_size - 32 :].copy().view(np.int8).reshape(n_tok, cols)
    gq_q, gq_d, gq_s = ggml_q8(x)  # the test's own reading of the C quantisers
    np.testing.assert_array_equal(yq, gq_q)
    np.testing.assert_array_equal(yd, gq_d)
    if ys is not None:
        np.testing.assert_array_equal(ys, gq_s)
    c_generic, c_native = ggml.vec_dot(qt, raw, y, generic=True), ggml.vec_dot(qt, raw, y)  # (T, R)
    terms = ggml_terms(raw, qt, yq, yd, ys)
    assert _bits_equal(sum_block_order(terms), c_generic)
    xp, sums = kernel_layout(yq)
    out = np.empty((n_tok, n_row), np.float32)
    matmul_q451_serial(out, raw, xp, yd, sums if qt == QT.Q5_0 else ys, FMT[qt], MARKERS[VARIANTS[-1]])
    assert _bits_equal(out, sum_kernel_order(terms))
    bound = tc.order_bound(terms)
    for ref in (c_generic, c_native):
        assert np.all(np.abs(out.astype(np.float64) - ref) <= bound)


# Compiles (never runs) the VNNI kernel for an AVX-512 CPU, as test_kernels does for Q4_0 and Q6_K: Q5_1
# (fifth bits and minimums) and Q5_0 (integer activation sums) cover every code path of the template.
_VNNI_COMPILE = tc.compile_script(
    "q451",
    [("matmul_q451_serial", tc.kernel_sig("float32", "T.uint32")), ("matmul_q451_serial", tc.kernel_sig("int32", "T.uint16"))],
)


@tc.x86_only
def test_vnni_kernel_compiles_for_avx512(tmp_path):
    tc.compile_for_zen4(tmp_path, _VNNI_COMPILE, "kernel")
