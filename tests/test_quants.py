"""edgemoe.quants against gguf.quants (gguf-py's reference, bit-exact with llama.cpp's C code).

Dequantisers and the Q8_0 / Q4_0 / F16 / BF16 quantisers must match gguf.quants bit for bit. gguf-py
has no Q4_K quantiser, so Q4_K is checked by decoding with gguf.quants, by its error against Q4_0's,
and by a digest of llama.cpp's quantize_row_q4_K_ref output.
"""

from __future__ import annotations

import hashlib

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from edgemoe.errors import UnsupportedError
from edgemoe.kernels.quantize_k import _fp16_bits_to_fp32, _fp32_to_fp16_bits
from edgemoe.qtensor import QTensor
from edgemoe.quants import dequantize, dequantize_qtensor, quantize, quantize_qtensor

ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZE_EXACT = [T.F16, T.BF16, T.Q8_0, T.Q4_0]

# Byte offsets of the f16 scale fields in each block type (ggml-common.h).
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}

# f16 bit patterns at the edges: +-65504, smallest subnormal, largest subnormal, smallest normal, +-0, 1.
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x8000, 0x0000, 0x3C00], dtype=np.uint16)
# float32 bit patterns at the edges, including bf16 rounding ties (even and odd), NaNs and infinities.
EXTREME_F32 = np.array(
    [0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F800001, 0xFFC00001, 0x7FBFFFFF, 0x7F800000,
     0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x807FFFFF, 0x80000000, 0x00000000, 0x477FF000,
     0x477FEFFF, 0x33000000, 0x33000001, 0x38800000, 0x387FFFFF, 0x7F7F8000, 0x3F800000, 0xC0000000],
    dtype=np.uint32,
)  # fmt: skip


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint32), b.view(np.uint32))


def _finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    h = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent 31 (inf/NaN) -> exponent 15
    return h


def _random_rows(qtype: T, rng: np.random.Generator, lead: tuple[int, ...], blocks_per_row: int) -> np.ndarray:
    """Random raw rows (*lead, row_bytes): random bytes with finite, partly extreme, f16 scales."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(lead)) * blocks_per_row
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if qtype in (T.F16, T.BF16):
        blocks[: len(EXTREME_F16)] = EXTREME_F16.view(np.uint8).reshape(-1, 2)
    elif qtype == T.F32:
        blocks[: len(EXTREME_F32)] = EXTREME_F32.view(np.uint8).reshape(-1, 4)
    else:
        for k, off in enumerate(F16_FIELDS[qtype]):
            h = _finite_f16_bits(rng, n_blocks)
            h[: len(EXTREME_F16)] = np.roll(EXTREME_F16, k)
            blocks[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
        blocks[-2:] = 0  # all-zero blocks
    return blocks.reshape(*lead, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    blocks_per_row = 4 if block_size == 256 else 64
    data = _random_rows(qtype, rng, (4, 8), blocks_per_row)
    n_cols = blocks_per_row * block_size
    ours = dequantize(data, qtype, n_cols)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(data, qtype)
    assert ours.dtype == np.float32 and ours.shape == (4, 8, n_cols)
    assert _bits_equal(ours, ref)


def _quantize_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    g = rng.standard_normal((8, 512)).astype(np.float32)
    outliers = g * np.where(rng.random(g.shape) < 0.01, 1000, 1).astype(np.float32)
    outliers[0, 5] = -3e4
    const = np.repeat(np.array([0.37, -2.5, 1e-3, 7.0, -1e-30, 3e4], dtype=np.float32)[:, None], 512, axis=1)
    # Exact grids: Q8_0 blocks with amax 127 (d = 1) hold k + 0.5, where roundf breaks ties away from zero.
    ties = np.tile(np.concatenate([[127.0, -127.0], np.arange(-14.5, 15.5)]).astype(np.float32), (2, 16))
    q4_grid = np.tile(np.concatenate([[-8.0], np.arange(-7.5, 8.0, 0.5)[:31]]).astype(np.float32), (2, 16))
    return {
        "gaussian": g,
        "outliers": outliers,
        "zeros": np.zeros((4, 512), np.float32),
        "constant": const,
        "ties": ties,
        "q4_grid": q4_grid,
        "mixed_scales": g * np.float32(10.0) ** rng.integers(-6, 5, (8, 1)).astype(np.float32),
    }


@pytest.mark.parametrize("qtype", QUANTIZE_EXACT, ids=lambda t: t.name)
def test_quantize_matches_gguf(qtype):
    for name, x in _quantize_cases(np.random.default_rng(7)).items():
        ours = quantize(x, qtype)
        ref = np.asarray(gq.quantize(x, qtype)).view(np.uint8)
        assert ours.dtype == np.uint8 and ours.shape == ref.shape, name
        assert np.array_equal(ours, ref), name


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_quantize_special_floats_matches_gguf(qtype):
    """Rounding ties, NaN, inf, overflow and subnormals; random bit patterns over the whole range."""
    bits = np.concatenate([EXTREME_F32, np.random.default_rng(3).integers(0, 1 << 32, 1000, dtype=np.uint32)])
    x = bits.view(np.float32).reshape(1, -1)
    with np.errstate(all="ignore"):
        ref = np.asarray(gq.quantize(x, qtype)).view(np.uint8)
        ours = quantize(x, qtype)
    assert np.array_equal(ours, ref)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def test_q4_k_roundtrip_beats_q4_0_and_decodes_like_gguf():
    x = np.random.default_rng(11).standard_normal((16, 1024)).astype(np.float32)
    q = quantize(x, T.Q4_K)
    assert q.shape == (16, 4 * 144) and q.dtype == np.uint8
    ref = gq.dequantize(q, T.Q4_K)
    assert _bits_equal(dequantize(q, T.Q4_K, 1024), ref)
    rmse_k = _rmse(ref, x)
    rmse_0 = _rmse(gq.dequantize(gq.quantize(x, T.Q4_0), T.Q4_0), x)
    # Unit Gaussian: Q4_K (6-bit scales and mins per 32) gives ~0.071, Q4_0 (absmax per 32) ~0.086.
    assert rmse_k < 0.075
    assert rmse_k < 0.9 * rmse_0


def test_q4_k_special_rows():
    x = np.zeros((4, 512), np.float32)
    x[1] = 0.37
    x[2] = -2.5
    rng = np.random.default_rng(5)
    x[3] = rng.standard_normal(512) * np.where(rng.random(512) < 0.02, 100, 1)
    q = quantize(x, T.Q4_K)
    y = gq.dequantize(q, T.Q4_K)
    assert _bits_equal(dequantize(q, T.Q4_K, 512), y)
    assert np.array_equal(y[0], np.zeros(512, np.float32))
    # A constant row is stored through one f16 scale (or min) times a 6-bit factor: ~1e-3 relative.
    assert np.allclose(y[1], 0.37, rtol=2e-3) and np.allclose(y[2], -2.5, rtol=2e-3)
    assert np.all(np.isfinite(y[3])) and _rmse(y[3], x[3]) < 0.2 * float(np.abs(x[3]).max())


def _golden_q4_k_input() -> np.ndarray:
    """64 blocks from integer hashing and float64 + - * / only, so every platform makes the same floats."""
    i = np.arange(64 * 256, dtype=np.uint64)

    def u(m: int) -> np.ndarray:  # quasi-random uniform [0, 1)
        return ((i * np.uint64(m)) % np.uint64(2**32)).astype(np.float64) / 2.0**32

    g = (u(2654435761) + u(2246822519) + u(3266489917) + u(668265263) - 2.0) * 1.7320508  # ~N(0, 1)
    g = np.where(u(374761393) < 0.01, g * 50.0, g)  # outliers
    scale = np.array([0.01, 0.1, 1.0, 10.0, 1000.0])[(i // 256) % 5]
    x = (g * scale).reshape(64, 256)
    x[56:60] *= u(2870177450).reshape(64, 256)[56:60] < 0.1  # sparse blocks
    x[60] = 0.0
    x[61] = 0.37
    x[62] = -2.5
    x[63] = u(3432918353).reshape(64, 256)[63] + 0.5  # all positive
    return x.astype(np.float32)


def test_q4_k_matches_llama_cpp_digest():
    """Bytes of llama.cpp's quantize_row_q4_K_ref (ggml-quants.c at 01243c5) on this input.

    The digest was recorded from that C function built with gcc -O2 -ffp-contract=off; a build that
    fuses multiply-adds (e.g. -march=native with FP contraction) rounds differently in some blocks.
    """
    x = _golden_q4_k_input()
    assert hashlib.sha256(x.tobytes()).hexdigest().startswith("14ed4c774dd24662"), "input generator changed"
    q = quantize(x.reshape(4, 4096), T.Q4_K)
    expected = "d2b0f90dd1dc29d2e3db98df25cf9641761a5ed3e8ba95d295787a3077ca093f"
    assert hashlib.sha256(q.tobytes()).hexdigest() == expected


def test_kernel_f16_conversions_match_numpy():
    """The Q4_K kernel converts f32 <-> f16 itself (Numba has no float16); numpy is the oracle."""
    fbuf = np.empty(1, np.float32)
    ubuf = fbuf.view(np.uint32)
    rng = np.random.default_rng(9)
    bits = np.concatenate([EXTREME_F32, rng.integers(0, 1 << 32, 3000, dtype=np.uint32)])
    bits = np.concatenate([bits, (rng.integers(0x32F00000, 0x47900000, 3000, dtype=np.uint32))])  # f16 range
    f = bits.view(np.float32)
    f = f[~np.isnan(f)]
    ours = np.array([_fp32_to_fp16_bits(v, fbuf, ubuf) for v in f], dtype=np.uint16)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours, f.astype(np.float16).view(np.uint16))
    halves = np.arange(1 << 16, dtype=np.uint16)
    halves = halves[(halves & 0x7C00) != 0x7C00]
    ours32 = np.array([_fp16_bits_to_fp32(int(h), fbuf, ubuf) for h in halves], dtype=np.float32)
    assert _bits_equal(ours32, halves.view(np.float16).astype(np.float32))


def test_qtensor_round_trip():
    x = np.random.default_rng(2).standard_normal((6, 256)).astype(np.float32)
    for qtype in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K]:
        w = quantize_qtensor(x, qtype)
        assert isinstance(w, QTensor) and w.qtype == qtype and w.shape == (6, 256)
        assert w.data.dtype == np.uint8 and w.data.flags.c_contiguous
        assert _bits_equal(dequantize_qtensor(w), np.asarray(gq.dequantize(w.data, qtype)).reshape(6, 256))
    assert np.array_equal(dequantize_qtensor(quantize_qtensor(x, T.F32)), x)


def test_errors():
    x = np.zeros((2, 256), np.float32)
    for qtype in [T.Q5_K, T.Q6_K]:
        with pytest.raises(UnsupportedError, match=qtype.name):
            quantize(x, qtype)
    with pytest.raises(UnsupportedError):
        quantize(x, T.Q2_K)
    with pytest.raises(UnsupportedError):
        quantize(np.zeros((2, 48), np.float32), T.Q8_0)  # 48 is not a multiple of 32
    with pytest.raises(ValueError):
        dequantize(np.zeros((2, 33), np.uint8), T.Q8_0, 32)
    with pytest.raises(ValueError):
        dequantize(np.zeros((2, 34), np.float32), T.Q8_0, 32)
    with pytest.raises(ValueError):
        quantize_qtensor(np.zeros(256, np.float32), T.Q8_0)
