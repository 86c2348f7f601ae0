"""KV cache types (`--cache-type f16|q8_0|f32`, f16 the default): the kernels round as NumPy (f16: to nearest, ties
to even) and gguf.quants (Q8_0) do, reading back is exact, so attention over a cache gives the bits of attention
over an f32 cache holding the same values; and the default model's logits stay close to the f32 cache's."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from edgemoe.kernels import ops
from edgemoe.kernels.kv_access import load_kv1, store_kv_row
from edgemoe.kv_cache import KVCache


@njit
def _round(x, out):
    store_kv_row(out, 0, x, x.shape[0])


@njit
def _widen(h, out):
    for i in range(out.shape[0]):
        out[i] = load_kv1(h, 0, i)


def test_rounding_is_numpys():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # every finite half
    ties = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exactly between two halves
    edges = np.array([0.0, -0.0, 65504, 65519.99, 65520, 1e10, np.inf, -np.inf, 2.98e-8, 2.99e-8, 1e-45],
                     dtype=np.float32)
    x = np.concatenate([x, ties, -ties, halves.astype(np.float32), edges])
    got = np.zeros(x.size, np.uint16)
    _round(x, got)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want), np.nonzero(got != want)[0][:5]
    back = np.zeros(x.size, np.float32)
    _widen(got, back)
    assert np.array_equal(back, got.view(np.float16).astype(np.float32))
    nan = np.zeros(1, np.uint16)
    _round(np.array([np.nan], np.float32), nan)
    assert np.isnan(nan.view(np.float16)[0])


def test_q8_0_rows_are_gguf_quants():
    """The kernels' Q8_0 rows are gguf.quants' bytes (the oracle), zeros, ties and wide ranges included; reading
    them back gives gguf's dequantised values."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(256) * 10.0 ** rng.integers(-6, 5) for _ in range(200)]
    rows += [np.zeros(64), np.arange(-64, 64) / 2.0, np.full(32, 127.0 / 2), (np.arange(96) - 48) * 1e-30]
    for x in rows:
        x = x.astype(np.float32)
        got = np.zeros(x.size // 32 * 34, np.uint8)
        _round(x, got)
        assert np.array_equal(got, quants.quantize(x[None], GGMLQuantizationType.Q8_0)[0])
        back = np.zeros(x.size, np.float32)
        _widen(got, back)
        assert np.array_equal(back, quants.dequantize(got[None], GGMLQuantizationType.Q8_0)[0])


def _stored(x, cache_type):
    """(values the cache holds as float32, the cache's arrays) for x (K, S, d) float32."""
    from gguf import GGMLQuantizationType, quants

    if cache_type == "f16":
        return x.astype(np.float16).astype(np.float32), x.astype(np.float16).view(np.uint16)
    q = quants.quantize(x, GGMLQuantizationType.Q8_0)  # (K, S, d / 32 * 34)
    return quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(x.shape), q


@pytest.mark.parametrize("cache_type,R,r", [("f16", 32, 8), ("f16", 52, 12), ("q8_0", 512, 64), ("q8_0", 56, 8)])
def test_latent_attention_equals_f32_holding_the_same_values(cache_type, R, r):
    """DeepSeek's latent attention (kernels/mla.py) over an f16 or q8_0 cache of [latent ; rope key] rows gives
    the bits it gives over an f32 cache holding the same values, row widths with and without 8-value tails."""
    from edgemoe.kernels.mla import mla_attention

    rng = np.random.default_rng(R + r)
    T, H, n, v, pos0 = 3, 4, 16, 12, 21
    S = pos0 + T + 2
    q_nope = rng.standard_normal((T, H, n)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, r)).astype(np.float32)
    w_uk = (rng.standard_normal((H, n, R)) * 0.2).astype(np.float32)
    w_uv = (rng.standard_normal((H, v, R)) * 0.2).astype(np.float32)
    f32, stored = _stored(rng.standard_normal((1, S, R + r)).astype(np.float32), cache_type)
    want, got = np.empty((T, H, v), np.float32), np.empty((T, H, v), np.float32)
    mla_attention(want, q_nope, q_pe, np.ascontiguousarray(f32[0]), w_uk, w_uv, pos0, np.float32(0.3))
    mla_attention(got, q_nope, q_pe, np.ascontiguousarray(stored[0]), w_uk, w_uv, pos0, np.float32(0.3))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
@pytest.mark.parametrize("T,H,K,d,pos0", [(1, 8, 2, 64, 37), (5, 4, 4, 32, 0), (3, 6, 2, 96, 11)])
def test_attention_equals_f32_holding_the_same_values(cache_type, T, H, K, d, pos0):
    rng = np.random.default_rng(T * 100 + d)
    S = pos0 + T + 3
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    k32, kc = _stored(rng.standard_normal((K, S, d)).astype(np.float32), cache_type)
    v32, vc = _stored(rng.standard_normal((K, S, d)).astype(np.float32), cache_type)
    want = np.empty((T, H, d), np.float32)
    ops.attention(want, q, k32, v32, pos0, np.float32(d ** -0.5))
    got = np.empty_like(want)
    ops.attention(got, q, kc, vc, pos0, np.float32(d ** -0.5))
    assert np.array_equal(got, want)


def test_cache_bytes_and_writes():
    f32, f16 = KVCache(2, 16, 2, 8, "f32"), KVCache(2, 16, 2, 8, "f16")
    assert f16.nbytes * 2 == f32.nbytes and f16.row_bytes * 2 == f32.row_bytes
    k = np.random.default_rng(1).standard_normal((3, 2, 8)).astype(np.float32)  # (n, K, d)
    f16.write(1, 4, k, -k)
    assert np.array_equal(f16.k[1, :, 4:7].view(np.float16), k.transpose(1, 0, 2).astype(np.float16))
    with pytest.raises(Exception, match="unknown KV cache type"):
        KVCache(1, 4, 1, 8, "q4")
    with pytest.raises(Exception, match="multiple of 32"):
        KVCache(1, 4, 1, 8, "q8_0")
    q8 = KVCache(2, 16, 2, 64, "q8_0")
    assert q8.row_bytes * 64 == KVCache(2, 16, 2, 64, "f16").row_bytes * 34
    with pytest.raises(ValueError, match="does not fit"):
        f16.load_prefix(f32.k, f32.v, 2)  # a prefix of another type is not this cache's


def test_default_model_logits_stay_close_to_f32():
    """Greedy decoding of the default model over 96 tokens: the f16 cache picks the same tokens, its logits
    within a small distance of the f32 cache's (tools/bench_kv_cache.py reports the figures)."""
    from edgemoe.default_model import default_model_path
    from edgemoe.loader import load_model

    m = load_model(default_model_path())
    m.model.fused = False  # the kernel-by-kernel path (test_fused checks the fused one gives its bits): cheap to compile
    ids = m.tokenizer.encode("ROMEO.\nBut soft, what light through yonder window breaks?")

    def run(cache_type):
        cache = m.model.new_cache(len(ids) + 97, cache_type)
        logits = [m.model.forward(np.asarray(ids), cache)[-1]]
        for _ in range(96):
            logits.append(m.model.forward(np.asarray([int(logits[-1].argmax())]), cache)[-1])
        return np.stack(logits)

    a, b = run("f32"), run("f16")
    assert np.array_equal(a.argmax(1), b.argmax(1))
    assert 0 < np.abs(a - b).max() < 1.0
    if m.model.args.head_dim % 32 == 0:
        c = run("q8_0")
        assert (a.argmax(1) == c.argmax(1)).mean() > 0.8 and np.abs(a - c).max() < 4.0
