"""Matrix kernels against gguf-py's dequantisation, and the int8 path against a NumPy emulation of
ggml's int8 scheme (activation quantisers ported from ggml-quants.c, checked against gguf-py's
Q8_0 quantiser where it has one). Every variant this CPU can run is tested, so the portable path
is covered on every machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from weight_factory import dequant, make_weight

from edgemoe.errors import UsageError
from edgemoe.kernels import dispatch, kernel_names, kinds, matmul, matvec, set_threads
from edgemoe.kernels.q8act import quantize_q8_0, quantize_q8_k
from edgemoe.qtensor import SUPPORTED_TYPES, QTensor

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
Q0_TYPES = (QT.Q8_0, QT.Q4_0)
K_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K)
# single token, remainder only, tiles + remainder, one chunk of 64, two chunks
TOKENS = (1, 3, 17, 64, 70)
# (rows, cols): odd rows; 96 = 3 blocks of 32 (tail only), 352 = 8 + 3 blocks (a group of 8 +
# tail); 256 * k for the K types
SHAPES = {QT.F32: ((37, 96), (5, 352))}
SHAPES.update({t: SHAPES[QT.F32] for t in FLOAT_TYPES + Q0_TYPES})
SHAPES.update({t: ((37, 256), (5, 768)) for t in K_TYPES})


# ---- NumPy emulation of ggml's activation quantisers (from ggml-quants.c) ---------------------


def q8_0_ref(x: np.ndarray) -> np.ndarray:
    """x (T, C) -> values the Q8_0 int8 path uses: roundf(x / d) * d, d = amax/127 per 32."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(xb).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    v = (xb * inv).astype(np.float32)
    q = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)  # roundf
    return (q * d.astype(np.float64)).reshape(x.shape)


def q8_k_ref(x: np.ndarray):
    """x (T, C) -> (q int8 (T, C), d f32 (T, C/256)) by quantize_row_q8_K_ref."""
    xb = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(xb).argmax(axis=2)[..., None]  # first largest |x|, like the strict '>' scan
    vmax = np.take_along_axis(xb, idx, axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax == 0, np.float32(0), np.float32(-127) / vmax).astype(np.float32)
        d = np.where(vmax == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    q = np.minimum(127, np.rint((iscale * xb).astype(np.float32)))  # nearest_int: half to even
    return q.astype(np.int8).reshape(x.shape), d[..., 0]


def int8_ref(x: np.ndarray, qt: QT) -> np.ndarray:
    """The activation values (float64) the int8 kernels effectively multiply with."""
    if qt in Q0_TYPES:
        return q8_0_ref(x)
    q, d = q8_k_ref(x)
    n_tok = x.shape[0]
    return (q.reshape(n_tok, -1, 256) * d[..., None].astype(np.float64)).reshape(x.shape)


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", FLOAT_TYPES + Q0_TYPES + K_TYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantised_weights(qt, variant):
    rng = np.random.default_rng(int(qt))
    for rows, cols in SHAPES[qt]:
        w = make_weight(qt, rows, cols, rng)
        wd = dequant(w)
        for n_tok in TOKENS:
            x = rng.standard_normal((n_tok, cols), dtype=np.float32)
            out = np.full((n_tok, rows), np.nan, np.float32)
            matmul(out, w, x)
            scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T  # |x| . |W| per output
            err = np.abs(out - x.astype(np.float64) @ wd.T) / scale
            # int8 activations: error of rounding x to 1/254 of each block's max
            assert err.max() < (1e-5 if qt in FLOAT_TYPES else 1e-2), (
                rows,
                cols,
                n_tok,
            )
            if qt not in FLOAT_TYPES:
                # the same int8 arithmetic, emulated: only f32 rounding may differ
                xe = int8_ref(x, qt)
                exact = (xe @ wd.T - out) / (np.abs(xe) @ np.abs(wd).T)
                assert np.abs(exact).max() < 1e-5, (rows, cols, n_tok)


@pytest.mark.parametrize("qt", (QT.F16, QT.Q4_0, QT.Q4_K), ids=lambda t: t.name)
def test_matvec_equals_matmul_row(qt, variant):
    rng = np.random.default_rng(1)
    rows, cols = SHAPES[qt][1]
    w = make_weight(qt, rows, cols, rng)
    x = rng.standard_normal((3, cols), dtype=np.float32)
    full = np.empty((3, rows), np.float32)
    matmul(full, w, x)
    for t in range(3):
        out = np.empty(rows, np.float32)
        matvec(out, w, x[t])
        np.testing.assert_allclose(out, full[t], rtol=1e-5, atol=1e-5)


def test_read_only_weights(variant):
    """Weights memory-mapped read-only from a model file work too (a separate specialisation)."""
    rng = np.random.default_rng(5)
    w = make_weight(QT.Q4_K, 3, 256, rng)
    w.data.setflags(write=False)
    x = rng.standard_normal(256, dtype=np.float32)
    out = np.empty(3, np.float32)
    matvec(out, w, x)
    exact = dequant(w) @ int8_ref(x[None], QT.Q4_K)[0]
    np.testing.assert_allclose(out, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


def test_f16_decodes_every_finite_half_exactly(variant):
    bits = np.arange(1 << 16, dtype=np.uint16)
    bits = bits[(bits & 0x7C00) != 0x7C00].reshape(248, 256)  # all 63488 finite halves
    w = QTensor.from_array(bits, QT.F16, 248, 256)
    out = np.empty((256, 248), np.float32)
    matmul(out, w, np.eye(256, dtype=np.float32))  # picks out column t of W
    np.testing.assert_array_equal(out.T, bits.view(np.float16).astype(np.float32))
    special = np.array([[np.inf], [-np.inf], [np.nan], [-2.0]], np.float16)
    out = np.empty(4, np.float32)
    matvec(out, QTensor.from_array(special, QT.F16, 4, 1), np.ones(1, np.float32))
    np.testing.assert_array_equal(out, special[:, 0].astype(np.float32))


def test_q8_0_activations_match_gguf():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 288), dtype=np.float32) * np.float32(3)  # 9 blocks
    x[1, :32] = 0  # an all-zero block
    xq, xd, xs = np.empty((3, 288), np.int8), np.empty((3, 9), np.float32), np.empty((3, 9), np.float32)
    quantize_q8_0(xq, xd, xs, x, 0)
    ref = quantize(x, QT.Q8_0).reshape(3, 9, 34)
    np.testing.assert_array_equal(xq.reshape(3, 9, 32), ref[:, :, 2:].view(np.int8))
    np.testing.assert_array_equal(xd.astype(np.float16), ref[:, :, :2].copy().view(np.float16)[..., 0])
    np.testing.assert_allclose(xs, xd * xq.reshape(3, 9, 32).sum(axis=2), rtol=1e-6)
    # pair layout (Q4_0): blocks 2p, 2p+1 interleaved by 16-value halves, the odd last one plain
    xp = np.empty_like(xq)
    quantize_q8_0(xp, xd, xs, x, 1)
    pairs = xq[:, :256].reshape(3, 4, 2, 2, 16).transpose(0, 1, 3, 2, 4).reshape(3, 256)
    np.testing.assert_array_equal(xp, np.concatenate([pairs, xq[:, 256:]], axis=1))


def test_q8_k_activations_match_ggml_rules():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 512), dtype=np.float32)
    x[0, 5] = -9.0  # the largest |x|, negative: it maps to -127 and d > 0
    x[1, 256:] = 0  # an all-zero super-block
    xq = np.empty((2, 512), np.int8)
    xd = np.empty((2, 2), np.float32)
    xb = np.empty((2, 32), np.int32)
    quantize_q8_k(xq, xd, xb, x)
    q, d = q8_k_ref(x)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xb, q.reshape(2, 32, 16).sum(axis=2, dtype=np.int32))
    assert xq[0, 5] == -127 and xd[0, 0] > 0


def test_kernel_names_and_threads():
    names = kernel_names()
    assert list(names) == [t.name for t in SUPPORTED_TYPES]  # the other types' kernels: test_mxfp4.py, test_*_types.py
    assert all(isinstance(v, str) and v for v in names.values())
    with pytest.raises(UsageError):
        set_threads(0)
    with pytest.raises(UsageError):
        dispatch.force_variant("sse9")
    set_threads(1)
    set_threads(dispatch.numba.config.NUMBA_NUM_THREADS)
    with pytest.raises(UsageError):
        dispatch.force_variant("generic", "TQ1_0")


def test_variant_pinned_per_type():
    try:
        dispatch.force_variant("generic", "Q4_0")
        assert kernel_names()["Q4_0"] == kinds.INT8["generic"]
        assert kernel_names()["Q8_0"] == kernel_names()["Q4_K"]  # the others keep the default
        assert dispatch.current_variant("Q4_0") == "generic"
    finally:
        dispatch.force_variant(None)
    assert dispatch.current_variant("Q4_0") == dispatch.detect_variant()


def test_shape_and_dtype_checks():
    w = make_weight(QT.Q4_0, 4, 64, np.random.default_rng(4))
    with pytest.raises(ValueError):
        matvec(np.empty(5, np.float32), w, np.ones(64, np.float32))
    with pytest.raises(ValueError):
        matmul(np.empty((2, 4), np.float32), w, np.ones((3, 64), np.float32))
    with pytest.raises(TypeError):
        matvec(np.empty(4, np.float32), w, np.ones(64, np.float64))


# Compiles (never runs) every kind's kernel with the vnni marker for an AVX-512 CPU, so a machine without
# VNNI still checks that the IR lowers (instead of aborting in LLVM's instruction selection) and that each
# kind's `isa` tells the truth: vpdpbusd in the code exactly where the doctor says so, dot products 256-bit.
_VNNI_COMPILE = r"""
import re
import numpy as np
from numba import typeof
from edgemoe.kernels import intrinsics
from edgemoe.kernels.kinds import KINDS
from edgemoe.kernels.q8act import activations
for kind in KINDS.values():
    xq, xd, xs = activations(kind.act, 1, 256)
    args = []
    kind.call(lambda *a: args.extend(a), np.empty((1, 8), np.float32), np.empty((8, 64), np.uint8),
              np.empty((1, 256), np.float32) if kind.act == "f32" else xq, xd, xs, intrinsics.VNNI)
    sig = tuple(typeof(a) for a in args)
    serial = kind.matmul[1]
    serial.compile(sig)
    asm = serial.inspect_asm(sig)
    assert ("vpdpbusd" in asm) == ("vpdpbusd" in kind.isa["vnni"]), kind.name
    assert not re.search(r"vpdpbusd\s+%zmm|vpmaddubsw\s+%zmm", asm), kind.name  # the dot products are 256-bit
print(len(KINDS), "kinds checked")
"""
_ZEN4 = "+avx512f,+avx512vl,+avx512bw,+avx512dq,+avx512cd,+avx512vnni,+avx2,+fma,+f16c,+avx,+bmi2"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
def test_vnni_kernels_compile_for_avx512(tmp_path):
    """On a CPU without VNNI the kernels are compiled for a Zen 4; on one with it, for the CPU itself."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))  # fresh: cached code cannot be inspected
    if "vnni" not in dispatch.supported_variants():
        env.update(NUMBA_CPU_NAME="znver4", NUMBA_CPU_FEATURES=_ZEN4)
    print("compiled for", env.get("NUMBA_CPU_NAME", "this CPU"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _VNNI_COMPILE], env=env, cwd=root, check=True, timeout=600)
