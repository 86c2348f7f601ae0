"""tools/synth_model.py writes real Qwen3-MoE, Qwen2-MoE and OLMoE files: the engine loads them as that family,
their packs stream bit-identically to the plain files, and llama.cpp (when installed) loads them and agrees."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from edgemoe.experts.setup import StreamOptions
from edgemoe.loader import load_model
from edgemoe.partition import verify_pack

_TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "synth_model.py")
FAMILIES = {"qwen3-30b-a3b": ("qwen3_moe", "qwen3moe"), "olmoe-1b-7b": ("olmoe", "olmoe"),
            "qwen1.5-moe-a2.7b": ("qwen2_moe", "qwen2moe")}
SMALL = ["--scale", "0.125", "--layers", "2", "--experts", "8", "-q"]  # hidden 256, head_dim 128
PROMPT = [1, 17, 43, 99, 120, 7, 64, 3, 88, 250, 12]


@pytest.fixture(scope="module")
def synth():
    spec = importlib.util.spec_from_file_location("synth_model", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(synth, tmp_path_factory):
    """preset → {"plain": Q4_K_M-like file, "packed": the same as a pack, "f32": all-F32 file}."""
    d = tmp_path_factory.mktemp("synth-families")
    out = {}
    for preset in FAMILIES:
        out[preset] = {}
        for kind, extra in (("plain", []), ("packed", ["--packed"]),
                            ("f32", ["--expert-quant", "F32", "--dense-quant", "F32"])):
            path = str(d / f"{preset}-{kind}.gguf")
            assert synth.main([preset, "-o", path, *SMALL, *extra]) == 0
            out[preset][kind] = path
    return out


def run(loaded, n=6, cache_type=None):
    """Prefill logits, then greedy decode logits: (len(PROMPT) + n, V)."""
    m = loaded.model
    cache = m.new_cache(64, cache_type)
    out = [m.forward(np.asarray(PROMPT), cache, all_logits=True)]
    for _ in range(n):
        out.append(m.forward(np.asarray([int(np.argmax(out[-1][-1]))]), cache))
    return np.concatenate(out)


@pytest.mark.parametrize("preset", FAMILIES)
def test_loads_as_the_family(files, preset):
    model_type, arch = FAMILIES[preset]
    loaded = load_model(files[preset]["plain"])
    assert loaded.args.model_type == model_type
    logits = run(loaded, n=2)
    assert np.isfinite(logits).all() and 0.2 < logits.std() < 5  # activations stay O(1)

    r = GGUFReader(files[preset]["plain"])
    assert r.fields["general.architecture"].contents() == arch
    keys = set(r.fields)
    assert f"{arch}.vocab_size" not in keys and f"{arch}.rope.dimension_count" not in keys  # as the converter
    tensors = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in r.tensors}
    assert "output.weight" in tensors  # untied: llama.cpp's qwen2moe / olmoe loaders require it
    D, d = 256, 128
    for name, (qtype, shape) in tensors.items():
        if name.endswith(("norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
            assert qtype == Q.F32, name
        elif "_exps" in name or "_shexp" in name:
            want = Q.Q4_K if shape[0] % 256 == 0 else Q.Q4_0  # rows of 1408·scale: Q4_0 for llama.cpp's Q5_0
            assert qtype == want, name
        else:
            assert qtype == Q.Q8_0, name
    if model_type == "qwen3_moe":
        assert tensors["blk.0.attn_q_norm.weight"][1] == tensors["blk.1.attn_k_norm.weight"][1] == (d,)
        assert r.fields["qwen3moe.attention.key_length"].contents() == d
        assert r.fields["qwen3moe.expert_feed_forward_length"].contents() == 256
        assert not any(".bias" in n or "shexp" in n for n in tensors)
    elif model_type == "olmoe":
        assert tensors["blk.0.attn_q_norm.weight"][1] == (D,) and tensors["blk.0.attn_k_norm.weight"][1] == (D,)
        assert r.fields["olmoe.feed_forward_length"].contents() == 256
        assert r.fields["olmoe.attention.head_count"].contents() == r.fields["olmoe.attention.head_count_kv"].contents()
        assert "olmoe.expert_feed_forward_length" not in keys and "olmoe.attention.key_length" not in keys
    else:
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"] == (Q.F32, (D, 1))
        assert tensors["blk.0.attn_q.bias"][1] == (D,) and "blk.0.attn_q_norm.weight" not in tensors
        assert tensors["blk.1.ffn_down_exps.weight"] == (Q.Q4_0, (192, D, 8))  # 1408 / 8 → 192, not 256-blocks
        assert r.fields["qwen2moe.expert_shared_feed_forward_length"].contents() == 768
        assert r.fields["qwen2moe.expert_feed_forward_length"].contents() == 192
        assert "qwen2moe.attention.key_length" not in keys


@pytest.mark.parametrize("preset", FAMILIES)
def test_pack_streams_bit_identical(files, preset):
    assert verify_pack(files[preset]["packed"]) == []
    reference = run(load_model(files[preset]["plain"]))
    probe = load_model(files[preset]["packed"], StreamOptions.from_budget(1))
    expert_mb = probe.model.experts.extents[0][0].nbytes / 2**20
    probe.model.experts.close()
    loaded = load_model(files[preset]["packed"], StreamOptions.from_budget(3 * expert_mb))  # 3 of 16 experts
    assert loaded.args.model_type == FAMILIES[preset][0]
    got = run(loaded)
    st = loaded.model.experts.stats()
    loaded.model.experts.close()
    c = st["cache"]  # experts evicted, or not kept (the admission rule): either way read again from the pack
    assert st["io"]["reads"] > 0 and c["evictions"] + c["rejected_admission"] > 0
    assert np.array_equal(got, reference)


@pytest.mark.parametrize("preset", FAMILIES)
def test_llamacpp_agrees(files, preset):
    pytest.importorskip("llama_cpp")
    import llamacpp_oracle

    path = files[preset]["f32"]
    theirs, (next_token,) = llamacpp_oracle.run(llamacpp_oracle.load(path), PROMPT, 1)  # (T, V), F32 KV cache
    m = load_model(path).model
    ours = m.forward(np.asarray(PROMPT), m.new_cache(64, "f32"), all_logits=True)  # (T, V)
    assert int(np.argmax(ours[-1])) == next_token
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()  # the same model, not just the same top-1


def test_preset_shapes(synth):
    q3 = synth.PRESETS["qwen3-30b-a3b"]
    assert (q3.family, q3.layers, q3.hidden, q3.heads, q3.kv_heads, q3.head_dim, q3.experts, q3.top_k,
            q3.intermediate, q3.rope_theta) == ("qwen3_moe", 48, 2048, 32, 4, 128, 128, 8, 768, 1e6)
    ol = synth.PRESETS["olmoe-1b-7b"]
    assert (ol.family, ol.layers, ol.hidden, ol.heads, ol.kv_heads, ol.experts, ol.top_k, ol.intermediate,
            ol.rope_theta) == ("olmoe", 16, 2048, 16, 16, 64, 8, 1024, 1e4)
    q2 = synth.PRESETS["qwen1.5-moe-a2.7b"]
    assert (q2.family, q2.layers, q2.hidden, q2.heads, q2.kv_heads, q2.experts, q2.top_k, q2.intermediate,
            q2.shared, q2.rope_theta) == ("qwen2_moe", 24, 2048, 16, 16, 60, 4, 1408, 5632, 1e6)
    assert synth.PRESETS["mixtral-8x7b"].family == synth.PRESETS["tiny"].family == "mixtral"
    # scaled: head_dim kept; OLMoE / Qwen2-MoE attention spans the hidden size; 1408 stays off the 256 grid
    s = synth.scaled(q2, 0.25)
    assert (s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.shared) == (512, 4, 4, 128, 352, 1536)
    assert synth.storage_type(Q.Q4_K, s.intermediate) == Q.Q4_0 and synth.storage_type(Q.Q4_K, s.shared) == Q.Q4_K
    s = synth.scaled(ol, 0.5, layers=8, experts=16)
    assert (s.hidden, s.heads, s.kv_heads, s.intermediate, s.layers, s.experts, s.top_k) == (1024, 8, 8, 512, 8, 16, 8)
    s = synth.scaled(q3, 0.5)
    assert (s.hidden, s.heads, s.kv_heads, s.intermediate) == (1024, 16, 2, 512)
    assert synth.resolve_types(q3) == ("Q4_K", "Q8_0") and synth.resolve_types(synth.PRESETS["tiny"]) == ("Q4_0", "Q8_0")
    assert synth.resolve_types(q3, "q4_k_m", "F32", "F32") == ("F32", "F32")


def test_as_mixtral_writes_arch_llama(synth, tmp_path):
    path = str(tmp_path / "m.gguf")
    assert synth.main(["olmoe-1b-7b", "-o", path, "--as-mixtral", *SMALL]) == 0
    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert not any("attn_q_norm" in t.name for t in r.tensors)
    assert {t.tensor_type for t in r.tensors if "_exps" in t.name} == {Q.Q4_0}  # the old default
    assert load_model(path).args.model_type == "mixtral"
