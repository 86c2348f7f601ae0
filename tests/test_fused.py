"""The fused one-token kernels (kernels/fused.py) give the bits of the kernel-by-kernel path.

Decode steps run each layer's attention block and expert block as one parallel region each; the
path of separate kernels (used for several tokens at once) is itself checked against transformers
in test_mixtral.py and against batching in test_batch.py. Here every decode logit of the fused path
must equal that path's bit for bit, over weight types, layouts (stacked gate|up or separate), GQA
groupings, experts per token, thread counts and KV cache types (f32, f16, q8_0).
"""

from __future__ import annotations

import numpy as np
import pytest
from mixtral_factory import make_hf_mixtral

from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.kernels import set_threads
from edgemoe.loader import load_model

CASES = [  # (dense type, expert type, heads, kv heads, top-k)
    ("F32", "F32", 4, 2, 2),
    ("Q8_0", "Q4_0", 4, 2, 2),  # interleaved Q4_0 experts, gate and up stacked
    ("Q8_0", "Q8_0", 8, 1, 3),  # a group of 8 heads: two attention jobs per kv head
    ("Q4_K", "Q4_K", 6, 2, 1),  # K-quants: gate and up separate
    ("F16", "Q4_0", 4, 4, 2),
]


CACHE_CASE = CASES[1]  # the f32 and q8_0 caches are checked on this one (each type compiles the kernels again)


def other_caches_here(model, cache_type) -> None:
    if cache_type != "f16" and model.case != CACHE_CASE:
        pytest.skip(f"the {cache_type} cache is checked with {CACHE_CASE[0]}/{CACHE_CASE[1]} weights")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def model(request, tmp_path_factory):
    dense, experts, heads, kv, top_k = request.param
    _, cfg, tensors = make_hf_mixtral(hidden=256, intermediate=512, heads=heads, kv_heads=kv, experts=6,
                                      top_k=top_k, vocab=96, seed=5, head_dim=64)
    path = tmp_path_factory.mktemp("fused") / f"{dense}-{experts}.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype=dense, expert_qtype=experts)
    m = load_model(str(path)).model
    m.case = request.param
    return m


def decode(m, fused: bool) -> np.ndarray:
    m.fused = fused
    cache = m.new_cache(48)
    logits = [m.forward(np.asarray([3, 17, 4, 88, 9, 1, 50]), cache)[-1]]
    tok = int(logits[0].argmax())
    for _ in range(12):
        logits.append(m.forward(np.asarray([tok]), cache)[-1])
        tok = int(logits[-1].argmax())
    m.fused = True
    return np.stack(logits)


@pytest.mark.parametrize("threads,cache_type", [(1, "f16"), (2, "f16"), (2, "f32"), (2, "q8_0")])
def test_fused_decode_equals_separate_kernels(model, threads, cache_type):
    other_caches_here(model, cache_type)
    set_threads(threads)
    model.cache_type = cache_type
    try:
        want = decode(model, False)
        got = decode(model, True)
    finally:
        set_threads(2)
        model.cache_type = "f16"
    assert np.array_equal(got, want)


def test_fused_path_is_taken(model, monkeypatch):
    """The test above would pass trivially if decode steps never reached the fused kernels."""
    from edgemoe.kernels import fused

    calls = []
    for name in ("attention_block", "moe_block"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    decode(model, True)
    assert calls.count("attention_block") == calls.count("moe_block") > 0


def steps_of_rows(m, fused: bool) -> np.ndarray:
    """Two sequences stepped together with several tokens each (prompt chunks, then a verification-sized
    step): every logit row of both."""
    m.fused = fused
    a, b = m.new_cache(48), m.new_cache(48)
    out = [m.forward_batch([(np.asarray([3, 17, 4, 88, 9, 1, 50]), a), (np.asarray([5, 6, 7]), b)], rows=[7, 3]),
           m.forward_batch([(np.asarray([11, 12, 13, 14, 15]), a), (np.asarray([2]), b)], rows=[5, 1]),
           m.forward_batch([(np.asarray([20, 21]), a)], rows=[2])]
    m.fused = True
    return np.concatenate(out)


@pytest.mark.parametrize("threads,cache_type", [(1, "f16"), (2, "f16"), (2, "f32"), (2, "q8_0")])
def test_fused_rows_equal_separate_kernels(model, threads, cache_type, monkeypatch):
    """The expert block of several tokens in one region (kernels/fused.moe_rows_block) gives every row the
    bits of the separate kernels, and is the path taken."""
    from edgemoe.kernels import fused

    other_caches_here(model, cache_type)
    set_threads(threads)
    model.cache_type = cache_type
    try:
        want = steps_of_rows(model, False)
        calls = []
        real = fused.moe_rows_block
        monkeypatch.setattr(fused, "moe_rows_block", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = steps_of_rows(model, True)
    finally:
        set_threads(2)
        model.cache_type = "f16"
    assert calls and np.array_equal(got, want)
