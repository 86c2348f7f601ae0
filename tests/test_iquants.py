"""The lattice types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and IQ1_M, against gguf-py and ggml.

- The grid tables (quants/iquants.py, unpacked from gguf-py) equal ggml-common.h's, parsed from llama.cpp's
  source (the llama-cpp-python sdist, fetched once into ~/.cache/edgemoe-test-ggml).
- Dequantisation bit-identical to gguf.quants: random blocks, all-zero blocks, every f16 edge of the scale
  (subnormals, 65504, +-inf, NaN); and equal to llama.cpp's compiled dequantize_row_* (NaN sign aside).
- The kernels (kernels/iquants.py) against (a) the dequantised weights in float64, and (b) a NumPy emulation
  of ggml_vec_dot_iq*_q8_K: the exact integer sum per super-block (taken from gguf-py's dequantisation of the
  same blocks with d = 1, scaled to integers), then the generic C's f32 operations in its order, an FMA for
  IQ1 as GCC compiles it; bit for bit. Also bit for bit against llama.cpp's compiled generic C through
  ctypes, and within summation-order error of its AVX2 functions, where llama-cpp-python is installed.
- Batch rows bit-identical to the row alone (serial and parallel twins, 1 and 2 threads, token counts across
  the 4-token tile and the 64-token chunk), `kinds.KINDS`, the fused expert block, and a GGUF file holding
  each type through the loader's path to `linear`.
Test weights are random blocks (every index is a valid grid point) with sane f16 scales: gguf.quants cannot
quantise these types, and llama.cpp's quantisers need seconds to minutes of table set-up (the file-type
tests, test_llamacpp_file_types.py, run them). Every kernel test runs on each variant
`dispatch.supported_variants()` offers (it prints which); the vnni kernels are compiled for an AVX-512 CPU
when this one lacks VNNI.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import gguf.quants as gq
import numpy as np
import pytest
import type_checks as tc
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from edgemoe.kernels import iquants as kiq
from edgemoe.kernels import matmul
from edgemoe.kernels.q8act import activations
from edgemoe.qtensor import FORMATS, QTensor, check_supported
from edgemoe.quants import dequantize
from edgemoe.quants.iquants import grids

TYPES = (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M)
MARKERS = tc.MARKERS
# The generic C's constants: gguf-py's value with d = 1 times FACTOR is the integer (2s + 1) * weight
# (IQ1: (2s + 1) * (8 grid + delta)); the C multiplies its sum by FINAL at the end.
FACTOR = {QT.IQ2_XXS: 8, QT.IQ2_XS: 8, QT.IQ2_S: 8, QT.IQ3_XXS: 4, QT.IQ3_S: 1, QT.IQ1_S: 8, QT.IQ1_M: 8}
FINAL = {QT.IQ2_XXS: 0.125, QT.IQ2_XS: 0.125, QT.IQ2_S: 0.125, QT.IQ3_XXS: 0.25}
ONE = 0x3C00  # f16 bits of 1.0
# f16 bits of d: 0, -0, the smallest and largest subnormal, the smallest normal, +-65504, +-inf, NaN
F16_EDGES = (0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00)
SHAPES = ((37, 256), (5, 1792), (16, 2048))  # (rows, cols): 1, 7 and 8 super-blocks
TOKENS = tc.TOKENS
_bits_equal = tc.bits_equal
variant = tc.variant_fixture(tuple(t.name for t in TYPES))
ggml = tc.ggml_fixture()


# ---- blocks ----------------------------------------------------------------------------------------


def set_d(blocks: np.ndarray, qt: QT, bits) -> None:
    """Write the f16 scale d (bits, broadcast over blocks (..., type_size)) in place; IQ1_M keeps it in the
    top nibbles of its four uint16 scales."""
    bits = np.broadcast_to(np.asarray(bits, np.uint16), blocks.shape[:-1])
    if qt != QT.IQ1_M:
        blocks[..., 0:2] = bits[..., None].view(np.uint8)
        return
    sc = blocks[..., 48:56].copy().view(np.uint16)  # (..., 4)
    nib = (bits[..., None] >> np.arange(0, 16, 4, dtype=np.uint16)) & 0xF
    blocks[..., 48:56] = ((sc & 0x0FFF) | (nib << 12)).view(np.uint8)


def random_blocks(rng, qt: QT, rows: int, cols: int, scale=(1e-3, 1e-2)) -> np.ndarray:
    """(rows, cols / 256 * type_size) uint8: random bytes, f16 d drawn from [scale[0], scale[1])."""
    ts = GGML_QUANT_SIZES[qt][1]
    raw = rng.integers(0, 256, (rows, cols // 256, ts), dtype=np.uint8)
    set_d(raw, qt, rng.uniform(*scale, raw.shape[:-1]).astype(np.float16).view(np.uint16))
    return raw.reshape(rows, -1)


def weight(raw: np.ndarray, qt: QT) -> QTensor:
    return QTensor.from_array(raw, qt, raw.shape[0], raw.shape[1] // GGML_QUANT_SIZES[qt][1] * 256)


# ---- NumPy emulation of ggml_vec_dot_iq*_q8_K --------------------------------------------------------


def scale_d(raw: np.ndarray, qt: QT) -> np.ndarray:
    """(R, S) f32: each block's f16 d."""
    blocks = raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[qt][1])
    if qt != QT.IQ1_M:
        return blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    sc = blocks[..., 48:56].copy().view(np.uint16)
    bits = (sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0xF0) | ((sc[..., 2] >> 4) & 0xF00) | (sc[..., 3] & 0xF000)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def integer_weights(raw: np.ndarray, qt: QT) -> np.ndarray:
    """(R, S, 256) int64: every value's sub-block scale times its integer weight, from gguf-py's dequantisation
    of the same blocks with d = 1 (exact small multiples of 1/8 .. 1), times FACTOR."""
    ts = GGML_QUANT_SIZES[qt][1]
    blocks = raw.reshape(-1, ts).copy()
    set_d(blocks, qt, ONE)
    y = gq.dequantize(blocks, qt).astype(np.float64) * FACTOR[qt]  # (R * S, 256)
    q = np.rint(y).astype(np.int64)
    assert np.array_equal(q, y), "not integers: the block layout is not what this test assumes"
    return q.reshape(raw.shape[0], -1, 256)


fma32 = tc.fma32  # one f32 rounding, as vfmadd


def _round_f32(v) -> np.float32:
    """The f32 nearest the rational v (ties to even), by exact comparison."""
    from fractions import Fraction

    f = np.float32(float(v))
    near = sorted((f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))),
                  key=lambda c: (abs(Fraction(float(c)) - v), int(np.float32(c).view(np.uint32)) & 1))
    return near[0]


def test_fma_emulation():
    """fma32 rounds once: random operands and sums that land exactly halfway between two f32 in f64, where
    rounding twice goes the wrong way, against exact rational arithmetic."""
    from fractions import Fraction

    rng = np.random.default_rng(4)
    a = (rng.standard_normal(300) * 10.0 ** rng.integers(-3, 3, 300)).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    c = (rng.standard_normal(300) * 10.0 ** rng.integers(-3, 6, 300)).astype(np.float32)
    # (1 + 2**-23) * 2**-24 (1 - 2**-23) = 2**-24 - 2**-70: 1 + 2**-23 plus it rounds to the f32 midpoint in f64
    tie_a, tie_b = np.float32(1 + 2.0**-23), np.float32(2.0**-24 * (1 - 2.0**-23))
    a = np.append(a, [tie_a, -tie_a, tie_a]).astype(np.float32)
    b = np.append(b, [tie_b, tie_b, -tie_b]).astype(np.float32)
    c = np.append(c, [1 + 2.0**-23, -(1 + 2.0**-23), 1 + 2.0**-22]).astype(np.float32)
    want = [_round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c)]
    got = fma32(a, b, c)
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    assert got[-3] == np.float32(1 + 2.0**-23) and np.float32(np.float64(a[-3]) * b[-3] + c[-3]) != got[-3]


def ggml_dot(raw: np.ndarray, qt: QT, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """(T, R) f32: ggml_vec_dot_iq*_q8_K_generic of each weight row with each activation row (xq (T, C)
    int8, xd (T, S) f32), its f32 steps in the C's order."""
    n_tok = xq.shape[0]
    q = integer_weights(raw, qt)  # (R, S, 256)
    bsum = np.einsum("rsk,tsk->trs", q, xq.reshape(n_tok, -1, 256).astype(np.int64))  # (T, R, S) exact
    with np.errstate(all="ignore"):
        d = scale_d(raw, qt)[None, :, :] * xd[:, None, :]  # (T, R, S): f16(d_w) * d_x, one rounding
        sumf = np.zeros(bsum.shape[:2], np.float32)
        for s in range(bsum.shape[2]):
            if qt in (QT.IQ1_S, QT.IQ1_M):  # sumf += d * (sumi + 0.125 * sumi1), compiled to an FMA
                sumf = fma32(d[:, :, s], bsum[:, :, s].astype(np.float32) * np.float32(0.125), sumf)
            else:  # sumf += d * bsum
                sumf = sumf + d[:, :, s] * bsum[:, :, s].astype(np.float32)
        return np.float32(FINAL[qt]) * sumf if qt in FINAL else sumf


q8_k = tc.engine_q8_k  # xq int8, xd (T, C/256) f32, xs (T, C/16) int32 sums


# ---- tables and dequantisation ----------------------------------------------------------------------


def test_format_rows():
    for qt in TYPES:
        assert FORMATS[qt][:3] == (256, GGML_QUANT_SIZES[qt][1], "f16"), qt.name
        assert check_supported(int(qt), "t") == qt
    assert FORMATS[QT.IQ1_M].scale_offsets == ()  # its d is split over four nibbles


def test_grids_are_built_on_first_use_only():
    """Importing the engine builds no table: gguf-py's grids and ours stay unbuilt until a kernel compiles
    or a dequantisation runs."""
    code = (
        "import gguf.quants as gq, edgemoe.kernels, edgemoe.kernels.kinds, edgemoe.quants\n"
        "from edgemoe.quants.iquants import grids\nfrom edgemoe.kernels.iquants import tables\n"
        "assert gq.IQ2_XXS.grid is None and gq.IQ1_S.grid is None\n"
        "assert grids.cache_info().currsize == 0 and tables.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent)


GGML_COMMON = "ggml/src/ggml-common.h"


def _ggml_common_h() -> pathlib.Path | None:
    """llama.cpp's ggml-common.h from the llama-cpp-python sdist (which vendors llama.cpp), cached; None when
    it cannot be fetched."""
    from llamacpp_sdist import SDIST, TREE

    cache = pathlib.Path.home() / ".cache" / "edgemoe-test-ggml" / "ggml-common.h"
    if cache.is_file():
        return cache
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
                           check=True, capture_output=True, timeout=900)
            with tarfile.open(next(pathlib.Path(tmp).glob("*.tar.gz"))) as tf:
                member = next(m for m in tf.getmembers() if m.name.endswith(TREE + GGML_COMMON))
                text = tf.extractfile(member).read()
        cache.parent.mkdir(parents=True, exist_ok=True)
        part = cache.with_suffix(".part")
        part.write_bytes(text)
        os.replace(part, cache)  # whole or absent
        return cache
    except (OSError, subprocess.SubprocessError, tarfile.TarError, StopIteration):
        return None


def _c_table(text: str, name: str, ctype: type) -> np.ndarray:
    """GGML_TABLE_BEGIN(type, name, size) ... GGML_TABLE_END() of ggml-common.h as an array of `ctype`."""
    m = re.search(r"GGML_TABLE_BEGIN\(\w+, " + name + r", \w+\)(.*?)GGML_TABLE_END\(\)", text, re.S)
    body = re.sub(r"//[^\n]*", "", m.group(1))
    return np.array([int(v, 0) for v in re.findall(r"0x[0-9a-fA-F]+|\d+", body)], dtype=np.uint64).astype(ctype)


def test_grids_match_ggml_common_h():
    path = _ggml_common_h()
    if path is None:
        pytest.skip("llama.cpp's ggml-common.h could not be fetched (pip download of the llama-cpp-python sdist)")
    text = path.read_text()
    g = grids()
    want = {
        "iq2xxs_grid": (g.iq2xxs, np.uint64), "iq2xs_grid": (g.iq2xs, np.uint64), "iq2s_grid": (g.iq2s, np.uint64),
        "iq3xxs_grid": (g.iq3xxs, np.uint32), "iq3s_grid": (g.iq3s, np.uint32), "iq1s_grid": (g.iq1s, np.uint64),
        "ksigns_iq2xs": (g.ksigns, np.uint8),
    }
    for name, (ours, ctype) in want.items():
        table = _c_table(text, name, ctype)
        assert table.size * table.itemsize == ours.nbytes, name
        np.testing.assert_array_equal(table.view(ours.dtype).reshape(ours.shape), ours, err_msg=name)
        assert not ours.flags.writeable
    assert set(np.unique(g.iq1s)) == {-1, 0, 1} and set(np.unique(g.iq2s)) == {8, 25, 43}


def _edge_blocks(rng, qt: QT) -> np.ndarray:
    """(n, type_size): random blocks, all-zero blocks and every f16 edge of d (IQ1_M: in its nibbles)."""
    ts = GGML_QUANT_SIZES[qt][1]
    raw = rng.integers(0, 256, (64 + len(F16_EDGES), ts), dtype=np.uint8)  # random d: any f16 bits
    raw[-len(F16_EDGES):] = rng.integers(0, 256, (len(F16_EDGES), ts), dtype=np.uint8)
    set_d(raw[-len(F16_EDGES):], qt, np.array(F16_EDGES, np.uint16))
    raw[:4] = 0  # all-zero blocks: d = 0
    return raw


def test_dequantize_matches_gguf():
    rng = np.random.default_rng(1)
    for qt in TYPES:
        raw = _edge_blocks(rng, qt)
        with np.errstate(all="ignore"):
            ref = gq.dequantize(raw, qt)
        ours = dequantize(raw.reshape(2, -1), qt, raw.shape[0] // 2 * 256).reshape(-1, 256)
        assert ours.dtype == np.float32 and _bits_equal(ours, ref), qt.name
        assert not np.any(ours[:4]) and np.isnan(ours).any() and np.isinf(ours).any(), qt.name


# ---- llama.cpp's compiled C (ctypes) ----------------------------------------------------------------


def test_dequantize_matches_llama_cpp(ggml):
    """Many random blocks (every grid point of every table with near certainty) through llama.cpp's
    dequantize_row_*: the same floats. (gcc turns `* -1.f` into a sign flip, which flips NaN's sign too.)"""
    rng = np.random.default_rng(2)
    for qt in TYPES:
        raw = np.concatenate([_edge_blocks(rng, qt), random_blocks(rng, qt, 4096, 256)])
        ref = ggml.dequantize(qt, raw)  # (blocks, 256)
        ours = dequantize(raw, qt, 256)
        nan = np.isnan(ref)
        np.testing.assert_array_equal(np.isnan(ours), nan, err_msg=qt.name)
        assert _bits_equal(np.where(nan, 0, ours), np.where(nan, 0, ref)), qt.name


_q8_k_blocks = tc.q8_k_blocks


def test_kernels_match_llama_cpp(variant, ggml):
    """The engine's Q8_K activations are ggml's (quantize_row_q8_K_ref); the kernels give the compiled generic
    C's bits (IQ1's FMA included), and agree with llama.cpp's AVX2 functions within their summation order."""
    rng = np.random.default_rng(3)
    rows, cols, n_tok = 11, 1792, 5
    x = rng.standard_normal((n_tok, cols), dtype=np.float32)
    x[1, :256] = 0
    xq, xd, xs = q8_k(x)
    yb = _q8_k_blocks(xq, xd, xs)
    ref_q8 = ggml.quantize_q8(QT.Q8_K, x, ref=True)  # zeros to start with: an all-zero block's bsums stay 0
    np.testing.assert_array_equal(yb, ref_q8.reshape(yb.shape))
    for qt in TYPES:
        raw = random_blocks(rng, qt, rows, cols)
        out = np.empty((n_tok, rows), np.float32)
        matmul(out, weight(raw, qt), x)
        assert _bits_equal(out, ggml.vec_dot(qt, raw, yb, generic=True)), qt.name
        native = ggml.vec_dot(qt, raw, yb)
        # bound: a few roundings of every partial sum, each below sum_s |d_s| * sum |q| |x|
        mags = np.einsum("rsk,tsk->trs", np.abs(integer_weights(raw, qt)), np.abs(xq.reshape(n_tok, -1, 256).astype(np.int64)))
        bound = 4 * cols / 256 * 2.0**-24 * (np.abs(scale_d(raw, qt)[None] * xd[:, None, :]) * mags).sum(-1) / FACTOR[qt]
        assert np.all(np.abs(out.astype(np.float64) - native) <= bound), qt.name


# ---- kernels -----------------------------------------------------------------------------------------


def test_matmul_matches_dequantised_and_ggml(variant, monkeypatch):
    rng = np.random.default_rng(11)
    try:
        for qt in TYPES:
            for rows, cols in SHAPES:
                raw = random_blocks(rng, qt, rows, cols)
                w, wd = weight(raw, qt), gq.dequantize(raw, qt).astype(np.float64)  # (R, C)
                x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)  # (T, C)
                single = tc.rows_alone(monkeypatch, w, x)  # (T, R) token by token
                # (a) the dequantised weights in float64: the error of rounding x to int8 (1/254 of its max)
                err = tc.relative_error(single, x, wd)
                assert err.max() < 1e-2, (qt.name, rows, cols, err.max())
                # (b) ggml's arithmetic on the same activations, bit for bit
                xq, xd, _ = q8_k(x)
                assert _bits_equal(single, ggml_dot(raw, qt, xq, xd)), (qt.name, rows, cols)
                # batch rows bit-identical to the row alone: serial and parallel twins, 1 and 2 threads
                tc.check_batch_rows(monkeypatch, w, x, single, f"{qt.name} {rows}x{cols}")
    finally:
        tc.reset_threads()


def test_kernels_at_the_edges(variant):
    """Every f16 edge of d (subnormal, 65504, inf, NaN), all-zero blocks, an all-zero and a huge activation
    row (overflow to inf, inf - inf = NaN) into the raw kernels: the emulation's bits, NaN where it has NaN."""
    rng = np.random.default_rng(12)
    marker = MARKERS[variant]
    rows, cols = len(F16_EDGES) + 3, 1024
    x = rng.standard_normal((4, cols), dtype=np.float32)
    x[1] = 0
    x[2] *= np.float32(1e36)
    xq, xd, xs = q8_k(x)
    for qt in TYPES:
        raw = random_blocks(rng, qt, rows, cols).reshape(rows, 4, -1)
        set_d(raw[: len(F16_EDGES), 1], qt, np.array(F16_EDGES, np.uint16))
        raw[-1] = 0
        raw = raw.reshape(rows, -1)
        raw.setflags(write=False)  # as QTensor holds weights: the kernels dispatch compiles
        want = ggml_dot(raw, qt, xq, xd)
        for kernel in (getattr(kiq, f"matmul_{qt.name.lower()}_serial"), getattr(kiq, f"matmul_{qt.name.lower()}")):
            out = np.full((4, rows), -1.0, np.float32)
            kernel(out, raw, xq, xd, xs, marker)
            nan = np.isnan(want)
            np.testing.assert_array_equal(np.isnan(out), nan, err_msg=qt.name)
            assert _bits_equal(np.where(nan, 0, out), np.where(nan, 0, want)), qt.name
        assert nan.any() and np.isinf(want).any() and not np.any(want[:, -1]), qt.name  # zero weights: 0
        assert np.all((want[1] == 0) | nan[1]), qt.name  # zero activations: 0, or NaN from an inf/NaN d


def test_row_kinds(variant):
    """kinds.KINDS: each type's row-range function on slices of the matrix gives matvec's bits."""
    from edgemoe.kernels.kinds import KINDS

    rng = np.random.default_rng(13)
    rows, cols = 21, 512
    x = rng.standard_normal(cols, dtype=np.float32)
    for qt in TYPES:
        kind = KINDS[(qt, 1)]
        assert kind.name == qt.name and kind.act == "q8_k"
        w = weight(random_blocks(rng, qt, rows, cols), qt)
        xq, xd, xs = activations(kind.act, 1, cols)
        kind.quant(xq, xd, xs, x[None])
        tc.check_row_ranges(kind, w, x, (xq, xd, xs), ((0, 8), (8, 9), (9, 21)), MARKERS[variant], qt.name)


def test_fused_expert_block(variant):
    """Lattice-type experts (IQ2_XXS gate/up, IQ1_M down) in the fused one-token expert block: the bits of
    the separate kernels."""
    from edgemoe.experts.store import Expert

    rng = np.random.default_rng(14)
    D, n_i, A = 256, 512, 3
    experts = [Expert(weight(random_blocks(rng, QT.IQ2_XXS, n_i, D), QT.IQ2_XXS),
                      weight(random_blocks(rng, QT.IQ2_XXS, n_i, D), QT.IQ2_XXS),
                      weight(random_blocks(rng, QT.IQ1_M, D, n_i), QT.IQ1_M)) for _ in range(A)]
    kinds = tc.moe_kinds(experts)
    assert kinds is not None and (kinds[0].name, kinds[1].name) == ("IQ2_XXS", "IQ1_M")
    tc.check_fused_block(rng, experts, kinds)


def test_gguf_file_to_linear(tmp_path):
    """A GGUF holding a tensor of each type passes check_supported and to_qtensor; linear gives ggml's dot."""
    rng = np.random.default_rng(15)
    rows, cols = 24, 768
    raws = {qt: random_blocks(rng, qt, rows, cols) for qt in TYPES}
    names = {f"blk.0.{qt.name.lower()}.weight": (raw, qt) for qt, raw in raws.items()}
    tensors = tc.write_gguf(tmp_path / "lattice.gguf", names)
    assert [t.tensor_type for t in tensors] == list(TYPES)
    for t, (qt, raw) in zip(tensors, raws.items()):
        w = tc.loaded(t, qt, raw, cols, supported=False)
        tc.check_linear(rng, w, lambda x, raw=raw, qt=qt: ggml_dot(raw, qt, *q8_k(x)[:2]), what=qt.name)


# Compiles (never runs) a vnni kernel for an AVX-512 CPU, as test_kernels does for Q4_0 and Q6_K.
_VNNI_COMPILE = tc.compile_script(
    "iquants", [("matmul_iq2_xs_serial", tc.kernel_sig("int32")), ("matmul_iq1_s_serial", tc.kernel_sig("int32"))]
)


@tc.x86_only
def test_vnni_kernels_compile_for_avx512(tmp_path):
    tc.compile_for_zen4(tmp_path, _VNNI_COMPILE, timeout=900)
