"""The Mixtral forward pass against transformers (the reference implementation) on tiny random models.

Float weights must give the same logits (≤ 1e-4 × the logits' scale) and the same 32 greedy tokens, for
HF checkpoints in both expert layouts and for GGUF files written the way llama.cpp's converter writes them.
Quantised GGUF files are compared with transformers running on the dequantised weights (gguf-py's own
dequantiser, transformers' own Q/K de-permutation).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mixtral_factory import make_hf_mixtral, to_fused_layout
from reference_runs import dequantised_reference, engine_greedy, engine_logits, hf_greedy, hf_logits
from safetensors.numpy import save_file

from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.loader import load_model

PROMPT = [1, 7, 42, 99, 3, 64, 17, 5, 120, 33, 8]

SHAPES = {  # GQA ratios, tied/untied, top-1/2/3 of 4–8 experts, hidden sizes that are odd multiples of 32
    "gqa2-top2": dict(hidden=64, heads=4, kv_heads=2, experts=4, top_k=2),
    "mha-top1-tied": dict(hidden=96, heads=3, kv_heads=3, experts=4, top_k=1, tie=True),
    "gqa8-top3": dict(hidden=160, heads=8, kv_heads=1, experts=8, top_k=3, intermediate=64),
    "headdim-top2": dict(hidden=96, heads=2, kv_heads=1, experts=6, top_k=2, head_dim=32, layers=3),
    "top10-of-16": dict(hidden=64, heads=4, kv_heads=2, experts=16, top_k=10, intermediate=32),  # beyond the
    # one-token fused block's expert count: tokens run the grouped block
}


def save_checkpoint(d, cfg, tensors):
    d.mkdir(exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module", params=list(SHAPES))
def tiny(request):
    model, cfg, tensors = make_hf_mixtral(**SHAPES[request.param], seed=len(request.param))
    return model, cfg, tensors


def assert_close(ours, ref, tol):
    scale = np.abs(ref).max()
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} × scale {scale:.3g}"


def test_hf_per_expert_layout(tiny, tmp_path):
    model, cfg, tensors = tiny
    d = save_checkpoint(tmp_path / "ckpt", cfg, tensors)
    assert_close(engine_logits(d, PROMPT), hf_logits(model, PROMPT), 1e-4)
    assert engine_greedy(d, PROMPT, 32, "f32") == hf_greedy(model, PROMPT, 32)


def test_hf_fused_layout(tiny, tmp_path):
    model, cfg, tensors = tiny
    d = save_checkpoint(tmp_path / "fused", cfg, to_fused_layout(tensors))
    assert_close(engine_logits(d, PROMPT), hf_logits(model, PROMPT), 1e-4)


def test_decode_matches_prefill(tiny, tmp_path):
    """One token at a time through the KV cache gives the logits of the batched pass."""
    model, cfg, tensors = tiny
    d = save_checkpoint(tmp_path / "ckpt", cfg, tensors)
    m = load_model(str(d)).model
    cache = m.new_cache(64, "f32")
    stepwise = np.concatenate([m.forward(np.asarray([t]), cache) for t in PROMPT])
    assert_close(stepwise, hf_logits(model, PROMPT), 1e-4)


@pytest.mark.parametrize("merged", [True, False], ids=["merged-experts", "split-experts"])
def test_gguf_f32(tiny, tmp_path, merged):
    model, cfg, tensors = tiny
    path = tmp_path / "m.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype="F32", merged_experts=merged)
    assert_close(engine_logits(path, PROMPT), hf_logits(model, PROMPT), 1e-4)
    assert engine_greedy(path, PROMPT, 32, "f32") == hf_greedy(model, PROMPT, 32)


QUANT_CASES = {  # dense type, expert type, tolerance × logits scale (int8 activations for block types)
    "F16": ("F16", "F16", 2e-3),
    "BF16": ("BF16", "BF16", 2e-3),
    "Q8_0": ("Q8_0", "Q8_0", 3e-2),
    "Q4_0": ("Q8_0", "Q4_0", 3e-2),
    "Q4_K": ("Q8_0", "Q4_K", 3e-2),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_gguf_quantised_vs_dequantised_reference(case, tmp_path):
    dense, experts, tol = QUANT_CASES[case]
    model, cfg, tensors = make_hf_mixtral(hidden=256, intermediate=256, heads=4, kv_heads=2, experts=4, top_k=2)
    path = tmp_path / f"{case}.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype=dense, expert_qtype=experts)
    ref = dequantised_reference(model, cfg, path)
    ours = engine_logits(path, PROMPT)
    want = hf_logits(ref, PROMPT)
    assert_close(ours, want, tol)
    # The quantised model must still be the same model: top-1 agrees where the reference is decisive.
    top2 = np.sort(want, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tol * np.abs(want).max()
    assert (ours.argmax(-1) == want.argmax(-1))[decisive].all()


def test_f16_cache_stays_close_to_the_reference(tmp_path):
    """The engine's default KV cache (f16): the same prompt's logits, one token at a time, within f16's rounding of
    the f32 reference."""
    model, cfg, tensors = make_hf_mixtral(hidden=64, heads=4, kv_heads=2, experts=4, top_k=2, seed=9)
    d = save_checkpoint(tmp_path / "ckpt", cfg, tensors)
    m = load_model(str(d)).model
    cache = m.new_cache(64, "f16")
    stepwise = np.concatenate([m.forward(np.asarray([t]), cache) for t in PROMPT])
    assert_close(stepwise, hf_logits(model, PROMPT), 5e-3)


def test_long_prompt_in_one_pass(tmp_path):
    """A 150-token prompt (more than one 64-row kernel chunk, attention over a long causal window)."""
    model, cfg, tensors = make_hf_mixtral(hidden=64, heads=4, kv_heads=2, experts=4, top_k=2, seed=9)
    d = save_checkpoint(tmp_path / "ckpt", cfg, tensors)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 128, 150)]
    m = load_model(str(d)).model
    ours = m.forward(np.asarray(ids), m.new_cache(160, "f32"), all_logits=True)
    assert_close(ours, hf_logits(model, ids), 1e-4)


def test_many_routed_experts_decode_quantised(tmp_path):
    """Top-10 of 16 Q8_0 experts, one token at a time: past the one-token block's expert count, tokens run
    the grouped expert block (compiled once whatever the count) and still match the reference."""
    model, cfg, tensors = make_hf_mixtral(hidden=64, intermediate=64, heads=4, kv_heads=2, experts=16, top_k=10,
                                          seed=3)
    path = tmp_path / "top10.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype="Q8_0", expert_qtype="Q8_0")
    want = hf_logits(dequantised_reference(model, cfg, path), PROMPT)
    m = load_model(str(path)).model
    cache = m.new_cache(64, "f32")
    stepwise = np.concatenate([m.forward(np.asarray([t]), cache) for t in PROMPT])
    assert_close(stepwise, want, 3e-2)
