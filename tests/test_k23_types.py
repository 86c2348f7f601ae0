"""Q2_K and Q3_K (the 2- and 3-bit K super-blocks of Q2_K / Q3_K_S/M/L files) against gguf-py and ggml.

- Dequantisation bit-identical to gguf.quants: random bytes (every f16 d and dmin, subnormals, inf and
  NaN included), all-zero blocks, chosen edge scales, and the output of ggml's own quantisers
  (ggml_quantize_chunk, with and without an importance matrix), which ggml's dequantize_row_q2_K /
  q3_K (the compiled C, through ctypes) decode to the same bits.
- The kernels (kernels/k23matmul.py) against (a) the dequantised weights in float64; (b) a NumPy
  emulation of ggml's AVX2 vec_dot_q2_K_q8_K / vec_dot_q3_K_q8_K written from
  ggml-cpu/arch/x86/quants.c: per super-block 8 lanes of exact integer sums weighted by the sub-block
  scales (Q2_K: and 8 lanes of mins x activation sums), one fma per lane into an f32 accumulator, then
  hsum_float_8's order; the kernels reproduce it bit for bit on every variant; (c) ggml's compiled
  vec_dot itself: bit for bit when the library is an AVX2 build, and its generic C (same integers,
  other lanes) within the bound of f32 summation order.
- Batch rows bit-identical to the row alone, serial and parallel, 1 and 2 threads; the row-range kinds
  and the fused expert block; a GGUF file holding each type through the loader's path to `linear`.
Every kernel test runs on each variant `dispatch.supported_variants()` offers on this CPU (it prints
which); without VNNI, the vnni kernels are still compiled for an AVX-512 CPU to check they lower.
"""

from __future__ import annotations

from fractions import Fraction

import gguf.quants as gq
import numpy as np
import pytest
import type_checks as tc
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import kinds, matmul
from edgemoe.kernels.k23matmul import matmul_q2_k, matmul_q2_k_serial, matmul_q3_k, matmul_q3_k_serial
from edgemoe.qtensor import FORMATS, QTensor, check_supported
from edgemoe.quants import dequantize, quantize

TYPES = (QT.Q2_K, QT.Q3_K)
KERNELS = {QT.Q2_K: (matmul_q2_k_serial, matmul_q2_k), QT.Q3_K: (matmul_q3_k_serial, matmul_q3_k)}
F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,)}  # byte offsets of d (, dmin) in a block
MARKERS = tc.MARKERS
# f16 bit patterns: +-0, the smallest and largest subnormals, the smallest normal, 1, the largest
# finite, +-inf, NaN
EDGE_HALVES = (0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00)
# (rows, cols): one super-block, 3, 11 (Qwen1.5-MoE-like 2816-wide rows)
SHAPES = ((37, 256), (6, 768), (9, 2816))
TOKENS = tc.TOKENS
_bits_equal, _same = tc.bits_equal, tc.same
variant = tc.variant_fixture(tuple(t.name for t in TYPES))
ggml = tc.ggml_fixture()
q8_k_blocks, engine_q8_k = tc.q8_k_blocks, tc.engine_q8_k


def random_blocks(qt: QT, rng, rows: int, cols: int, scales=(1e-3, 2e-2)) -> np.ndarray:
    """(rows, row bytes) uint8: random bytes, each f16 field drawn from `scales` (None: random bits too)."""
    size = GGML_QUANT_SIZES[qt][1]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    if scales is not None:
        for off in F16_FIELDS[qt]:
            d = rng.uniform(*scales, (rows, cols // 256)).astype(np.float16)
            raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // 256, 2)
    return raw.reshape(rows, -1)


def weight(qt: QT, raw: np.ndarray) -> QTensor:
    return QTensor.from_array(raw, qt, raw.shape[0], raw.shape[1] // GGML_QUANT_SIZES[qt][1] * 256)


# ---- block format: dequantisation ------------------------------------------------------------------


def test_format_rows():
    assert FORMATS[QT.Q2_K] == (256, 84, "f16", (80, 82))
    assert FORMATS[QT.Q3_K] == (256, 110, "f16", (108,))
    for qt in TYPES:
        assert check_supported(int(qt), "t") == qt
        assert kinds.KINDS[(qt, 1)].act == "q8_k"
        with pytest.raises(UnsupportedError, match="not implemented"):  # gguf-py has no quantiser for them
            quantize(np.zeros((1, 256), np.float32), qt)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qt, ggml):
    rng = np.random.default_rng(int(qt))
    size = GGML_QUANT_SIZES[qt][1]
    raw = random_blocks(qt, rng, 64, 16 * 256, scales=None)  # random bits: every f16 field, NaN and inf too
    blocks = raw.reshape(-1, size)
    blocks[:8] = 0  # all-zero blocks
    for i, h in enumerate(EDGE_HALVES):  # each edge scale in d (and dmin) of a block of random quants
        for k, off in enumerate(F16_FIELDS[qt]):
            blocks[16 + 2 * i + k, off : off + 2] = np.array([h], np.uint16).view(np.uint8)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, qt)
        ours = dequantize(raw, qt, 16 * 256)
        c = ggml.dequantize(qt, raw)
    assert ours.dtype == np.float32 and _bits_equal(ours, ref)
    assert _same(c, ours)  # ggml's C agrees (NaN payloads aside)
    assert not np.any(ours[0, :2048]) and np.isnan(ours).any() and np.isinf(ours).any()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_ggml_quantiser_output(qt, ggml):
    rng = np.random.default_rng(2 + int(qt))
    x = rng.standard_normal((24, 2048)).astype(np.float32)
    x[3] *= np.float32(1e-3)
    x[4, :256] = 0  # an all-zero super-block
    x[5] = np.where(rng.random(2048) < 0.01, 50, 1).astype(np.float32) * x[5]  # outliers
    for imatrix in (None, (0.1 + rng.random(2048)).astype(np.float32)):
        raw = ggml.quantize(qt, x, imatrix)
        ours = dequantize(raw, qt, 2048)
        assert _bits_equal(ours, gq.dequantize(raw, qt)) and _bits_equal(ours, ggml.dequantize(qt, raw))
        assert np.corrcoef(ours.ravel(), x.ravel())[0, 1] > 0.9  # it is a quantisation of x
        assert not np.any(ours[4, :256])


# ---- NumPy emulation of ggml's AVX2 vec_dot_q2_K_q8_K / vec_dot_q3_K_q8_K -------------------------


fma32 = tc.fma32  # one f32 rounding, as vfmadd


def _round_f32(v: Fraction) -> np.float32:
    """The float32 nearest to the exact value v (ties to even)."""
    f = np.float32(float(v))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - v), int(np.array(c).view(np.uint32)) & 1))


def test_fma32_is_one_rounding():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(3000).astype(np.float32)
    b = rng.standard_normal(3000).astype(np.float32)
    c = (-(a.astype(np.float64) * b) * (1 + rng.standard_normal(3000) * 2.0**-20)).astype(np.float32)
    got = fma32(a, b, c)  # near-cancellation: the product's low bits decide the result
    exact = [_round_f32(Fraction(float(p)) * Fraction(float(q)) + Fraction(float(r))) for p, q, r in zip(a, b, c)]
    assert _bits_equal(got, np.array(exact, np.float32))
    assert not _bits_equal(got, a * b + c)  # two roundings differ


def _levels_2bit(qs: np.ndarray) -> np.ndarray:
    """(..., 64) bytes -> (..., 256): element 128n + 32k + l = (qs[32n + l] >> 2k) & 3 (ggml's loops)."""
    out = np.empty(qs.shape[:-1] + (256,), np.int64)
    for n in range(2):
        for k in range(4):
            out[..., 128 * n + 32 * k : 128 * n + 32 * k + 32] = (qs[..., 32 * n : 32 * n + 32] >> (2 * k)) & 3
    return out


def _q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """(..., 12) bytes -> (..., 16) scales - 32, by ggml's kmask unpacking on 32-bit words."""
    aux = np.ascontiguousarray(sc).view(np.uint32).astype(np.int64)  # (..., 3)
    a0, a1, a2 = aux[..., 0], aux[..., 1], aux[..., 2]
    k1, k2 = 0x03030303, 0x0F0F0F0F
    words = np.stack(
        [
            (a0 & k2) | (((a2 >> 0) & k1) << 4),
            (a1 & k2) | (((a2 >> 2) & k1) << 4),
            ((a0 >> 4) & k2) | (((a2 >> 4) & k1) << 4),
            ((a1 >> 4) & k2) | (((a2 >> 6) & k1) << 4),
        ],
        -1,
    )
    return words.astype(np.uint32).view(np.uint8).astype(np.int64) - 32  # (..., 16)


def ggml_avx2(qt: QT, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """(T, R) f32: ggml's AVX2 vec_dot of weights raw (R, S * size) with activations (xq, xd, xb).

    Lane m of a super-block's integer sum takes bytes 4m .. 4m+3 of each 32-value group g, weighted by
    the scale of sub-block 2g (m < 4) or 2g + 1 (m >= 4) (vpmaddubsw, then vpmaddwd by the shuffled
    scales); Q2_K's mins lane m = m[2m] * bsum[2m] + m[2m+1] * bsum[2m+1] (vpmaddwd of int16s).
    """
    n_row, n_tok, n_sb = raw.shape[0], xq.shape[0], xd.shape[1]
    blocks = raw.reshape(n_row, n_sb, -1)
    if qt == QT.Q2_K:
        scales = (blocks[..., 0:16] & 15).astype(np.int64)  # (R, S, 16)
        mins = (blocks[..., 0:16] >> 4).astype(np.int64)
        q = _levels_2bit(blocks[..., 16:80])  # (R, S, 256)
        d, dmin = (blocks[..., o : o + 2].copy().view(np.float16)[..., 0].astype(np.float32) for o in (80, 82))
    else:
        low = _levels_2bit(blocks[..., 32:96])
        hm = blocks[..., 0:32].astype(np.int64)
        high = np.concatenate([(hm >> j) & 1 for j in range(8)], axis=-1)  # element 32j + l: bit j of hmask[l]
        q = low - 4 * (1 - high)
        scales = _q3_k_scales(blocks[..., 96:108])
        d = blocks[..., 108:110].copy().view(np.float16)[..., 0].astype(np.float32)
    lane_scale = np.repeat(scales.reshape(n_row, n_sb, 8, 2), 4, axis=-1)  # (R, S, g, m)
    prods = np.einsum("rsgmb,tsgmb->trsgm", q.reshape(n_row, n_sb, 8, 8, 4), xq.reshape(n_tok, n_sb, 8, 8, 4).astype(np.int64))
    sumi = (prods * lane_scale[None]).sum(axis=3)  # (T, R, S, 8) exact
    assert np.abs(sumi).max() < 2**31
    acc = np.zeros((n_tok, n_row, 8), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(n_sb):
            if qt == QT.Q2_K:
                bs = xb[:, s * 16 : s * 16 + 16].astype(np.int64)  # (T, 16)
                pm = (mins[None, :, s] * bs[:, None]).reshape(n_tok, n_row, 8, 2).sum(axis=-1)  # (T, R, 8)
                neg = (-xd[:, s])[:, None] * dmin[None, :, s]  # -y.d * dmin
                acc = fma32(pm.astype(np.float32), neg[..., None], acc)
            dd = xd[:, s][:, None] * d[None, :, s]  # y.d * d
            acc = fma32(sumi[:, :, s].astype(np.float32), dd[..., None], acc)
        a = acc.transpose(2, 0, 1)
        return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))  # hsum_float_8


def test_emulation_is_ggml_avx2(ggml):
    """The emulation above against ggml's compiled AVX2 vec_dot (bit for bit) on random and real blocks."""
    if not ggml.avx2:
        pytest.skip("this llama-cpp-python build has no AVX2 vec_dot")
    rng = np.random.default_rng(6)
    for qt in TYPES:
        x = rng.standard_normal((3, 1024), dtype=np.float32)
        for raw in (random_blocks(qt, rng, 7, 1024), ggml.quantize(qt, rng.standard_normal((7, 1024), dtype=np.float32))):
            xq, xd, xb = engine_q8_k(x)
            assert _bits_equal(ggml.vec_dot(qt, raw, q8_k_blocks(xq, xd, xb)), ggml_avx2(qt, raw, xq, xd, xb)), qt


def test_activations_are_ggml_q8_k(ggml):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 768), dtype=np.float32)
    x[1, 256:512] = 0  # an all-zero super-block
    x[2, 7] = -30.0  # the largest |x| negative
    assert np.array_equal(q8_k_blocks(*engine_q8_k(x)), ggml.quantize_q8(QT.Q8_K, x))


# ---- kernel tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantised_and_ggml(qt, variant, monkeypatch, ggml):
    rng = np.random.default_rng(10 + int(qt))
    try:
        for n_row, cols in SHAPES:
            raw = random_blocks(qt, rng, n_row, cols)
            w, wd = weight(qt, raw), gq.dequantize(raw, qt).astype(np.float64)  # (R, C)
            x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)  # (T, C)
            single = tc.rows_alone(monkeypatch, w, x)  # (T, R) token by token
            # (a) the dequantised weights in float64: error of rounding x to int8 (1/254 of a block's max)
            assert tc.relative_error(single, x, wd).max() < 1e-2, (n_row, cols)
            # (b) ggml's AVX2 arithmetic, emulated, and (c) ggml's compiled C on the same activation blocks
            xq, xd, xb = engine_q8_k(x)
            want = ggml_avx2(qt, raw, xq, xd, xb)
            assert _bits_equal(single, want), (n_row, cols)
            act = q8_k_blocks(xq[:9], xd[:9], xb[:9])
            if ggml.avx2:
                assert _bits_equal(single[:9], ggml.vec_dot(qt, raw, act)), (n_row, cols)
            generic = ggml.vec_dot(qt, raw, act, generic=True)  # the same integers summed in other lanes
            bound = (8 * cols / 256 + 8) * 2.0**-23 * (np.abs(x[:9].astype(np.float64)) @ np.abs(wd).T)
            assert np.all(np.abs(single[:9].astype(np.float64) - generic) <= bound), (n_row, cols)
            # batch rows bit-identical to the row alone: serial and parallel twins, 1 and 2 threads
            tc.check_batch_rows(monkeypatch, w, x, single, f"{n_row}x{cols}")
    finally:
        tc.reset_threads()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_kernel_at_the_edges(qt, variant, ggml):
    """Edge f16 scales (subnormal, largest finite, inf, NaN, -0) and all-zero blocks into the raw kernels,
    on ggml's own activation blocks: the emulation's bits (NaN where it has NaN), and ggml's."""
    rng = np.random.default_rng(12 + int(qt))
    marker = MARKERS[variant]
    n_row, cols = 24, 1280
    raw = random_blocks(qt, rng, n_row, cols).reshape(n_row, 5, -1)
    for r in range(1, n_row):  # row r: edge half r % 10 in one field of super-block r % 5
        off = F16_FIELDS[qt][r % len(F16_FIELDS[qt])]
        raw[r, r % 5, off : off + 2] = np.array([EDGE_HALVES[r % len(EDGE_HALVES)]], np.uint16).view(np.uint8)
    raw[0] = 0
    raw = raw.reshape(n_row, -1)
    raw.setflags(write=False)  # as QTensor holds weights: the same compiled kernels as matmul's
    x = rng.standard_normal((6, cols), dtype=np.float32) * np.float32(3)
    x[1, :256] = 0
    act = ggml.quantize_q8(QT.Q8_K, x)
    xq, xd, xb = tc.unpack_q8_k(act, 6)
    want = ggml_avx2(qt, raw, xq, xd, xb)
    for kernel in KERNELS[qt]:
        out = np.full((6, n_row), -1.0, np.float32)
        kernel(out, raw, xq, xd, xb, marker)
        assert _same(out, want), kernel
    if ggml.avx2:
        assert _same(want, ggml.vec_dot(qt, raw, act))
    assert np.isnan(want).any() and not np.any(want[:, 0])


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_weights_quantised_by_ggml(qt, variant, ggml):
    """ggml's quantiser output through the public matmul: ggml's AVX2 bits, and close to x @ W.T."""
    rng = np.random.default_rng(14 + int(qt))
    n_row, cols = 40, 2048
    raw = ggml.quantize(qt, rng.standard_normal((n_row, cols), dtype=np.float32) * np.float32(0.02))
    x = rng.standard_normal((6, cols), dtype=np.float32)
    out = np.empty((6, n_row), np.float32)
    matmul(out, weight(qt, raw), x)
    assert _bits_equal(out, ggml_avx2(qt, raw, *engine_q8_k(x)))
    wd = gq.dequantize(raw, qt).astype(np.float64)
    assert tc.relative_error(out, x, wd).max() < 1e-2


def test_row_ranges_and_fused_expert_block(variant):
    """kinds.KINDS computes row ranges with matvec's bits; experts of Q3_K gate/up and Q2_K down run in
    the fused one-token expert block with the separate kernels' bits."""
    from edgemoe.experts.store import Expert

    rng = np.random.default_rng(16)
    marker = MARKERS[variant]
    for qt in TYPES:
        kind = kinds.KINDS[(qt, 1)]
        w = weight(qt, random_blocks(qt, rng, 21, 512))
        x = rng.standard_normal((1, 512), dtype=np.float32)
        tc.check_row_ranges(kind, w, x[0], engine_q8_k(x), ((0, 5), (5, 6), (6, 21)), marker, qt)

    D, n_i, A = 256, 512, 3
    shapes = ((QT.Q3_K, n_i, D), (QT.Q3_K, n_i, D), (QT.Q2_K, D, n_i))
    experts = [Expert(*(weight(qt, random_blocks(qt, rng, r, c)) for qt, r, c in shapes)) for _ in range(A)]
    pair = tc.moe_kinds(experts)
    assert pair is not None and (pair[0].name, pair[1].name) == ("Q3_K", "Q2_K")
    tc.check_fused_block(rng, experts, pair)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_gguf_file_to_linear(qt, tmp_path, ggml):
    """A GGUF holding a Q2_K / Q3_K 2-D tensor passes check_supported and to_qtensor; linear gives the product."""
    rng = np.random.default_rng(18)
    n_row, cols = 24, 1024
    raw = ggml.quantize(qt, rng.standard_normal((n_row, cols), dtype=np.float32))
    (t,) = tc.write_gguf(tmp_path / f"{qt.name}.gguf", {"blk.0.ffn_down.weight": (raw, qt)})
    w = tc.loaded(t, qt, raw, cols)
    wd = dequantize(w.data, qt, cols).astype(np.float64)
    tc.check_linear(rng, w, lambda x: ggml_avx2(qt, raw, *engine_q8_k(x)), wd, tokens=(1, 5))


# Compiles (never runs) the VNNI kernels for an AVX-512 CPU, as test_kernels does for Q4_0 and Q6_K.
_VNNI_COMPILE = tc.compile_script(
    "k23matmul", [("matmul_q2_k_serial", tc.kernel_sig("int32")), ("matmul_q3_k_serial", tc.kernel_sig("int32"))]
)


@tc.x86_only
def test_vnni_kernels_compile_for_avx512(tmp_path):
    tc.compile_for_zen4(tmp_path, _VNNI_COMPILE)
