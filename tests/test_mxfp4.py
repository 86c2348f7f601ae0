"""MXFP4 (gpt-oss's expert weights) as an engine weight type, against gguf-py and ggml's arithmetic.

- Dequantisation bit-identical to gguf.quants (random blocks, all-zero blocks, every E8M0 edge), and
  the quantiser bit-identical to gguf.quants.quantize.
- The kernel (kernels/mxfp4.py) against (a) the dequantised weights in float64, and (b) a NumPy
  emulation of ggml_vec_dot_mxfp4_q8_0: per block the exact integer dot `sumi` and one f32 term
  (d_x * d_w) * sumi. The terms are summed in the kernel's documented order (8 lanes, then the tail),
  which the emulation reproduces bit for bit; ggml's generic C adds them in block order, which differs
  only by float summation order, so that comparison uses the bound of that error.
- Batch rows bit-identical to the row alone, serial and parallel, 1 and 2 threads; the fused expert
  block; a GGUF file holding an MXFP4 tensor through the loader's path to `linear`.
Every kernel test runs on each variant `dispatch.supported_variants()` offers on this CPU (it prints
which); without VNNI, the vnni kernel is still compiled for an AVX-512 CPU to check it lowers.
"""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest
import type_checks as tc
from gguf import GGMLQuantizationType as QT

from edgemoe.errors import UnsupportedError
from edgemoe.kernels import matmul
from edgemoe.kernels.mxfp4 import matmul_mxfp4, matmul_mxfp4_serial
from edgemoe.kernels.q8act import quantize_q8_0_sums
from edgemoe.qtensor import FORMATS, QTensor, check_supported
from edgemoe.quants import KVALUES_MXFP4, dequantize, quantize

EDGE_SCALES = (0, 1, 2, 126, 127, 128, 254, 255)  # subnormal halves, 1/2, 1, 2, the largest two
# (rows, cols): 3 blocks (tail only), 8 + 1, 2 x 8 + 3, gpt-oss's 2880 (11 x 8 + 2)
SHAPES = ((37, 96), (5, 288), (3, 608), (16, 2880))
TOKENS = tc.TOKENS
_bits_equal = tc.bits_equal
variant = tc.variant_fixture(("MXFP4",))


def random_blocks(rng, rows: int, cols: int, scales=(118, 130)) -> np.ndarray:
    """(rows, cols / 32 * 17) uint8: random codes, E8M0 bytes drawn from [scales[0], scales[1])."""
    raw = rng.integers(0, 256, (rows, cols // 32, 17), dtype=np.uint8)
    raw[:, :, 0] = rng.integers(*scales, (rows, cols // 32))
    return raw.reshape(rows, -1)


def weight(raw: np.ndarray) -> QTensor:
    return QTensor.from_array(raw, QT.MXFP4, raw.shape[0], raw.shape[1] // 17 * 32)


# ---- block format: dequantisation and quantisation ----------------------------------------------


def test_format_row():
    assert FORMATS[QT.MXFP4] == (32, 17, "e8m0", (0,))
    assert check_supported(int(QT.MXFP4), "t") == QT.MXFP4
    np.testing.assert_array_equal(KVALUES_MXFP4, gq.MXFP4.kvalues)


def test_dequantize_matches_gguf():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (6, 64 * 17), dtype=np.uint8)  # every E8M0 byte and code
    raw[5] = 0  # all-zero blocks (e = 0, codes 0)
    blocks = raw.reshape(-1, 17)
    blocks[8 : 8 + len(EDGE_SCALES), 0] = EDGE_SCALES
    blocks[20 : 20 + 16, 1:] = (np.arange(16, dtype=np.uint8) * 0x11)[:, None]  # each code in a whole block
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, QT.MXFP4)
    ours = dequantize(raw, QT.MXFP4, 64 * 32)
    assert ours.dtype == np.float32 and _bits_equal(ours, ref)
    assert not np.any(ours[5])


def test_e8m0_edges():
    """E8M0 0..255 is 2**(e - 127) halved: 0 and 1 give subnormals, 255 gives 2**127 (ggml and gguf-py
    read no NaN code, unlike the OCP MX spec), so 255 with a large code overflows to inf."""
    blocks = np.zeros((256, 17), np.uint8)
    blocks[:, 0] = np.arange(256)
    blocks[:, 1] = 0x71  # value 0: code 1 (kvalue 1); value 16: code 7 (kvalue 12)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(blocks, QT.MXFP4)
        ours = dequantize(blocks.reshape(256, 17), QT.MXFP4, 32)
    assert _bits_equal(ours, ref)
    np.testing.assert_array_equal(ours[:, 0], np.ldexp(np.float32(1), np.arange(256) - 128).astype(np.float32))
    assert ours[0, 0] == np.float32(2.0**-128) and ours[255, 0] == np.float32(2.0**127)
    assert ours[252, 16] == np.float32(12 * 2.0**124) and ours[253, 16] == np.inf  # 12 * 2**125 > f32 max


def _quantize_cases(rng) -> dict[str, np.ndarray]:
    g = rng.standard_normal((8, 512)).astype(np.float32)
    grid = np.tile((KVALUES_MXFP4.astype(np.float32) / 2), (2, 32))  # exact E2M1 values, d = 1/2
    ties = np.tile(np.array([0.25, -0.25, 0.75, 1.25, 2.5, 3.5, 5.0, -5.0, 12.0], np.float32), (1, 64))[:, :512]
    return {
        "gaussian": g,
        "zeros": np.zeros((2, 512), np.float32),
        "mixed_scales": g * np.float32(10.0) ** rng.integers(-30, 30, (8, 1)).astype(np.float32),
        "outliers": g * np.where(rng.random(g.shape) < 0.01, 1e4, 1).astype(np.float32),
        "grid": grid,
        "ties": ties,  # halfway between two codes: the first (smaller index) wins
        "huge": g * np.float32(1e37),
    }


def test_quantize_matches_gguf():
    for name, x in _quantize_cases(np.random.default_rng(7)).items():
        ours = quantize(x, QT.MXFP4)
        ref = np.asarray(gq.quantize(x, QT.MXFP4)).view(np.uint8)
        assert ours.shape == ref.shape and np.array_equal(ours, ref), name
        assert _bits_equal(dequantize(ours, QT.MXFP4, x.shape[1]), gq.dequantize(ref, QT.MXFP4)), name
    grid = _quantize_cases(np.random.default_rng(7))["grid"]
    assert _bits_equal(dequantize(quantize(grid, QT.MXFP4), QT.MXFP4, 512), grid)  # exact values round-trip
    # below 2**-125 C's e would be negative (undefined; gguf-py wraps it): here e = 0, the smallest scale
    tiny = np.full((1, 32), 2.0**-127, np.float32)
    q = quantize(tiny, QT.MXFP4)
    assert q[0, 0] == 0 and _bits_equal(dequantize(q, QT.MXFP4, 32), tiny)
    with pytest.raises(UnsupportedError):
        quantize(np.full((1, 32), np.inf, np.float32), QT.MXFP4)


# ---- NumPy emulation of ggml_vec_dot_mxfp4_q8_0 -------------------------------------------------


def ggml_terms(raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """(T, R, B) f32 terms (d_x * d_w) * sumi of ggml's loop, for weights raw (R, B*17) and activation
    blocks xq (T, C) int8, xd (T, B) f32."""
    n_row, n_tok = raw.shape[0], xq.shape[0]
    blocks = raw.reshape(n_row, -1, 17)
    nb = blocks.shape[1]
    qs = blocks[:, :, 1:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=2)  # (R, B, 32)
    kv = KVALUES_MXFP4[codes].astype(np.int64)
    sumi = np.einsum("rbj,tbj->trb", kv, xq.reshape(n_tok, nb, 32).astype(np.int64))  # (T, R, B) exact
    dw = gq.MXFP4.e8m0_to_fp32_half(blocks[:, :, 0])  # (R, B) f32
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        d = xd[:, None, :] * dw[None, :, :]  # (T, R, B) f32, one rounding as the C
        return d * sumi.astype(np.float32)


sum_block_order, sum_kernel_order = tc.sum_block_order, tc.sum_kernel_order


def engine_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The engine's activation blocks (q8act), plain layout: ggml's int8 values, the scale amax / 127 kept in f32."""
    return tc.engine_q8_0(x)[:2]


def ggml_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's own Q8_0 activation blocks (gguf-py's quantiser): qs (T, C) int8 and d (T, B), f16 values."""
    return tc.ggml_q8_0(x)[1:]


# ---- kernel tests --------------------------------------------------------------------------------


def test_activations_are_ggml_q8_0():
    x = np.random.default_rng(3).standard_normal((3, 2880), dtype=np.float32)
    x[1, :32] = 0
    xq, xd = engine_q8_0(x)
    gq_q, gq_d = ggml_q8_0(x)
    np.testing.assert_array_equal(xq, gq_q)
    np.testing.assert_array_equal(xd.astype(np.float16).astype(np.float32), gq_d)
    for cols in (2880, 2880 - 32):  # an even and an odd number of blocks (the last one stays plain)
        xp, xs = np.empty((3, cols), np.int8), np.empty((3, cols // 32), np.int32)
        xd2 = np.empty((3, cols // 32), np.float32)
        quantize_q8_0_sums(xp, xd2, xs, np.ascontiguousarray(x[:, :cols]))
        want_q, want_s = tc.kernel_layout(xq[:, :cols].copy())
        np.testing.assert_array_equal(xp, want_q)
        np.testing.assert_array_equal(xs, want_s)
        np.testing.assert_array_equal(xd2, xd[:, : cols // 32])


def test_matmul_matches_dequantised_and_ggml(variant, monkeypatch):
    rng = np.random.default_rng(11)
    try:
        for rows, cols in SHAPES:
            raw = random_blocks(rng, rows, cols)
            w, wd = weight(raw), gq.dequantize(raw, QT.MXFP4).astype(np.float64)  # (R, C)
            x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)  # (T, C)
            single = tc.rows_alone(monkeypatch, w, x)  # (T, R) token by token
            # (a) the dequantised weights in float64: error of rounding x to int8 (1/254 of a block's max)
            assert tc.relative_error(single, x, wd).max() < 1e-2, (rows, cols)
            # (b) ggml's arithmetic on the same activation blocks, in the kernel's summation order
            xq, xd = engine_q8_0(x)
            terms = ggml_terms(raw, xq, xd)
            assert _bits_equal(single, sum_kernel_order(terms)), (rows, cols)
            ggml = sum_block_order(terms)  # the generic C's order: within its summation error
            assert np.all(np.abs(single.astype(np.float64) - ggml) <= tc.order_bound(terms)), (rows, cols)
            # batch rows bit-identical to the row alone: serial and parallel twins, 1 and 2 threads
            tc.check_batch_rows(monkeypatch, w, x, single, f"{rows}x{cols}")
    finally:
        tc.reset_threads()


def test_kernel_on_ggml_blocks_at_the_edges(variant):
    """ggml's own Q8_0 activation blocks (f16 scales) into the raw kernels, weights with every E8M0 edge
    (subnormal scales, 2**127, overflow to inf and inf - inf = NaN) and all-zero blocks: the
    emulation's bits, NaN where it has NaN."""
    rng = np.random.default_rng(12)
    marker = tc.MARKERS[variant]
    for rows, cols in ((24, 352), (9, 2880)):
        raw = random_blocks(rng, rows, cols, scales=(0, 256)).reshape(rows, -1, 17)
        raw[:, : len(EDGE_SCALES), 0] = EDGE_SCALES
        raw[0] = 0
        raw = raw.reshape(rows, -1)
        raw.setflags(write=False)  # as QTensor holds weights: the same compiled kernels as matmul's
        x = rng.standard_normal((5, cols), dtype=np.float32) * np.float32(4)
        x[1, :64] = 0
        xq, xd = ggml_q8_0(x)
        want = sum_kernel_order(ggml_terms(raw, xq, xd))
        xp, xs = tc.kernel_layout(xq)
        for kernel in (matmul_mxfp4_serial, matmul_mxfp4):
            out = np.full((5, rows), -1.0, np.float32)
            kernel(out, raw, xp, xd, xs, marker)
            nan = np.isnan(want)
            np.testing.assert_array_equal(np.isnan(out), nan)
            assert _bits_equal(np.where(nan, 0, out), np.where(nan, 0, want))
        assert nan.any() and np.isinf(want).any() and not np.any(want[:, 0])


def test_weights_quantised_by_gguf(variant):
    """Weights from gguf.quants.quantize (real E8M0 choices) through the public matmul."""
    rng = np.random.default_rng(13)
    rows, cols = 40, 2880
    raw = np.asarray(gq.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02, QT.MXFP4)).view(np.uint8)
    x = rng.standard_normal((6, cols), dtype=np.float32)
    out = np.empty((6, rows), np.float32)
    matmul(out, weight(raw), x)
    xq, xd = engine_q8_0(x)
    assert _bits_equal(out, sum_kernel_order(ggml_terms(raw, xq, xd)))
    wd = gq.dequantize(raw, QT.MXFP4).astype(np.float64)
    assert tc.relative_error(out, x, wd).max() < 1e-2


def test_fused_expert_block(variant):
    """MXFP4 experts run in the fused one-token expert block, with the bits of the separate kernels."""
    from edgemoe.experts.store import Expert

    rng = np.random.default_rng(14)
    D, n_i, A = 64, 96, 3
    experts = [Expert(*(weight(random_blocks(rng, r, c)) for r, c in ((n_i, D), (n_i, D), (D, n_i)))) for _ in range(A)]
    kinds = tc.moe_kinds(experts)
    assert kinds is not None and kinds[0].name == kinds[1].name == "MXFP4"
    tc.check_fused_block(rng, experts, kinds)


def test_gguf_file_to_linear(tmp_path):
    """A GGUF holding an MXFP4 2-D tensor passes check_supported and to_qtensor; linear gives the product."""
    rng = np.random.default_rng(15)
    rows, cols = 24, 2880
    raw = np.asarray(gq.quantize(rng.standard_normal((rows, cols), dtype=np.float32), QT.MXFP4)).view(np.uint8)
    (t,) = tc.write_gguf(tmp_path / "mxfp4.gguf", {"blk.0.ffn_down.weight": (raw, QT.MXFP4)})
    w = tc.loaded(t, QT.MXFP4, raw, cols)
    wd = dequantize(w.data, QT.MXFP4, cols).astype(np.float64)

    def expect(x):
        xq, xd = engine_q8_0(x)
        return sum_kernel_order(ggml_terms(raw, xq, xd))

    tc.check_linear(rng, w, expect, wd)


# Compiles (never runs) the VNNI kernel for an AVX-512 CPU, as test_kernels does for Q4_0 and Q6_K.
_VNNI_COMPILE = tc.compile_script("mxfp4", [("matmul_mxfp4_serial", tc.kernel_sig("int32"))])


@tc.x86_only
def test_vnni_kernel_compiles_for_avx512(tmp_path):
    tc.compile_for_zen4(tmp_path, _VNNI_COMPILE, "kernel")
