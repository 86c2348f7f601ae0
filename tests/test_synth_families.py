"""tools/synth_model.py writes real Qwen3-MoE, Qwen2-MoE, OLMoE, gpt-oss and DeepSeek-V2-Lite files: the engine
loads them as that family, their packs stream bit-identically to the plain files, and llama.cpp (when installed)
loads them and agrees."""

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
            want = Q.Q4_K if shape[0] % 256 == 0 else Q.Q5_0  # rows of 1408·scale: llama.cpp's fallback
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
        assert tensors["blk.1.ffn_down_exps.weight"] == (Q.Q5_0, (192, D, 8))  # 1408 / 8 → 192, not 256-blocks
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

    assert_llamacpp_agrees(files[preset]["f32"])


def assert_llamacpp_agrees(path: str) -> None:
    """llama.cpp and edgemoe on the same all-F32 file: the same next token and the same logits (the same model,
    not just the same top-1)."""
    import llamacpp_oracle

    theirs, (next_token,) = llamacpp_oracle.run(llamacpp_oracle.load(path), PROMPT, 1)  # (T, V), F32 KV cache
    m = load_model(path).model
    ours = m.forward(np.asarray(PROMPT), m.new_cache(64, "f32"), all_logits=True)  # (T, V)
    assert int(np.argmax(ours[-1])) == next_token
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


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
    assert synth.storage_type(Q.Q4_K, s.intermediate) == Q.Q5_0 and synth.storage_type(Q.Q4_K, s.shared) == Q.Q4_K
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


# The keys llama.cpp's convert_hf_to_gguf.py writes for a gpt-oss checkpoint (llama-cpp-python 0.3.36's, run on
# tests/family_factory.make_hf_gpt_oss), besides general.* and tokenizer.*.
GPT_OSS_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.scaling.type", "rope.scaling.factor",
                "rope.scaling.original_context_length", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
                "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_count", "expert_used_count",
                "attention.key_length", "attention.value_length", "attention.sliding_window",
                "expert_feed_forward_length"}
GPT_OSS_SMALL = ["--scale", "0.125", "--layers", "2", "--experts", "8", "-q"]  # hidden 352, 8 / 1 heads of 64


def test_gpt_oss_preset(synth, tmp_path):
    """gpt-oss-20b's shape as arch gpt-oss: MXFP4 experts with biases, sinks, sliding window, YaRN; the keys and
    tensor names of llama.cpp's converter; the engine loads it as gpt_oss with O(1) activations."""
    g = synth.PRESETS["gpt-oss-20b"]
    assert (g.family, g.layers, g.hidden, g.heads, g.kv_heads, g.head_dim, g.experts, g.top_k, g.intermediate,
            g.window, g.yarn, g.rope_theta) == ("gpt_oss", 24, 2880, 64, 8, 64, 32, 4, 2880, 128, (32.0, 4096), 150000.0)
    assert synth.resolve_types(g) == ("MXFP4", "Q8_0")
    path = str(tmp_path / "g.gguf")
    assert synth.main(["gpt-oss-20b", "-o", path, *GPT_OSS_SMALL]) == 0
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    assert arch == "gpt-oss"
    keys = {k[len(arch) + 1:] for k in r.fields if k.startswith(arch + ".")}
    assert keys == GPT_OSS_KEYS
    assert r.fields["gpt-oss.attention.sliding_window"].contents() == 128
    assert r.fields["gpt-oss.rope.scaling.type"].contents() == "yarn"
    tensors = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in r.tensors}
    D, H, I, E = 352, 8, 352, 8
    want = {"attn_norm.weight": (Q.F32, (D,)), "attn_q.weight": (Q.Q8_0, (D, H * 64)), "attn_q.bias": (Q.F32, (H * 64,)),
            "attn_k.bias": (Q.F32, (64,)), "attn_output.bias": (Q.F32, (D,)), "attn_sinks.weight": (Q.F32, (H,)),
            "post_attention_norm.weight": (Q.F32, (D,)), "ffn_gate_inp.bias": (Q.F32, (E,)),
            "ffn_gate_exps.weight": (Q.MXFP4, (D, I, E)), "ffn_down_exps.weight": (Q.MXFP4, (I, D, E)),
            "ffn_gate_exps.bias": (Q.F32, (I, E)), "ffn_up_exps.bias": (Q.F32, (I, E)),
            "ffn_down_exps.bias": (Q.F32, (D, E))}
    for name, expect in want.items():
        assert tensors[f"blk.1.{name}"] == expect, name
    assert not any("ffn_norm" in n for n in tensors)
    loaded = load_model(path)
    assert loaded.args.model_type == "gpt_oss" and loaded.args.sliding_window == 128
    logits = run(loaded, n=2)
    assert np.isfinite(logits).all() and 0.2 < logits.std() < 5


def test_gpt_oss_llamacpp_agrees(synth, tmp_path):
    """An all-F32 file of the preset's shape, YaRN off (llama.cpp's YaRN tables differ from transformers', see
    tests/test_families_vs_llamacpp.py): llama.cpp loads it as gpt-oss and gives the same logits."""
    pytest.importorskip("llama_cpp")
    from dataclasses import replace

    shape = replace(synth.scaled(synth.PRESETS["gpt-oss-20b"], 0.125, 2, 8), yarn=None, window=4)
    path = str(tmp_path / "g32.gguf")
    synth.synthesize(path, shape, name="g32", expert_quant="F32", dense_quant="F32", progress=False)
    assert_llamacpp_agrees(path)


def test_gpt_oss_packed_is_refused(synth, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(["gpt-oss-20b", "-o", str(tmp_path / "p.gguf"), "--packed", *GPT_OSS_SMALL])
    assert e.value.code == 2 and "--packed is not written for gpt-oss" in capsys.readouterr().err


# The keys llama.cpp's converter writes for a DeepSeek-V2 checkpoint without q compression and with YaRN (as
# DeepSeek-V2-Lite's), run on family_factory.make_hf_deepseek(2, q_lora_rank=None, yarn=...).
DEEPSEEK_V2_LITE_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "rope.freq_base", "attention.layer_norm_rms_epsilon",
    "expert_count", "expert_used_count", "attention.key_length", "attention.value_length",
    "leading_dense_block_count", "vocab_size", "attention.kv_lora_rank", "attention.key_length_mla",
    "attention.value_length_mla", "expert_feed_forward_length", "expert_shared_count", "expert_weights_scale",
    "rope.dimension_count", "rope.scaling.yarn_log_multiplier"}


def test_deepseek_v2_lite_preset(synth, tmp_path):
    """DeepSeek-V2-Lite's shape as arch deepseek2: latent attention (k_b / v_b split), a leading dense layer,
    shared experts, YaRN; the converter's keys and tensor names; the engine loads it as deepseek_v2."""
    p = synth.PRESETS["deepseek-v2-lite"]
    assert (p.family, p.layers, p.hidden, p.heads, p.experts, p.top_k, p.intermediate, p.shared, p.dense_ff,
            p.mla, p.dense_first, p.yarn) == ("deepseek_v2", 27, 2048, 16, 64, 6, 1408, 2816, 10944,
                                              (512, 128, 64, 128), 1, (40.0, 4096))
    path = str(tmp_path / "d.gguf")
    assert synth.main(["deepseek-v2-lite", "-o", path, "--scale", "0.125", "--layers", "3", "--experts", "8",
                       "-q"]) == 0
    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "deepseek2"
    keys = {k[len("deepseek2."):] for k in r.fields if k.startswith("deepseek2.")}
    assert keys == DEEPSEEK_V2_LITE_KEYS
    f = {k: r.fields["deepseek2." + k].contents() for k in keys}
    assert (f["attention.head_count"], f["attention.head_count_kv"], f["attention.key_length"],
            f["attention.value_length"], f["attention.key_length_mla"], f["attention.value_length_mla"],
            f["rope.dimension_count"], f["expert_shared_count"], f["expert_feed_forward_length"],
            f["leading_dense_block_count"]) == (2, 1, 576, 512, 192, 128, 64, 2, 192, 1)
    tensors = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in r.tensors}
    D, H = 256, 2
    want = {"blk.0.ffn_gate.weight": (Q.Q4_K, (D, 1376)), "blk.0.ffn_down.weight": (Q.Q5_0, (1376, D)),
            "blk.1.attn_q.weight": (Q.Q8_0, (D, H * 192)), "blk.1.attn_kv_a_mqa.weight": (Q.Q8_0, (D, 576)),
            "blk.1.attn_kv_a_norm.weight": (Q.F32, (512,)), "blk.1.attn_k_b.weight": (Q.Q8_0, (128, 512, H)),
            "blk.1.attn_v_b.weight": (Q.Q8_0, (512, 128, H)), "blk.1.attn_output.weight": (Q.Q8_0, (H * 128, D)),
            "blk.1.ffn_gate_exps.weight": (Q.Q4_K, (D, 192, 8)), "blk.1.ffn_down_exps.weight": (Q.Q5_0, (192, D, 8)),
            "blk.1.ffn_up_shexp.weight": (Q.Q4_K, (D, 384)), "blk.1.ffn_gate_inp.weight": (Q.F32, (D, 8))}
    for name, expect in want.items():
        assert tensors[name] == expect, name
    assert "blk.0.ffn_gate_inp.weight" not in tensors and "blk.1.ffn_gate_inp_shexp.weight" not in tensors
    loaded = load_model(path)
    assert loaded.args.model_type == "deepseek_v2" and loaded.args.q_lora_rank is None
    logits = run(loaded, n=2)
    assert np.isfinite(logits).all() and 0.2 < logits.std() < 5


def test_deepseek_v2_lite_llamacpp_agrees(synth, tmp_path):
    """All-F32, 27 layers (llama.cpp tells V2-Lite, which has no q_lora_rank key, by its layer count), YaRN over 8
    original positions so that it changes the tables: llama.cpp loads it as deepseek2 and gives the same logits."""
    pytest.importorskip("llama_cpp")
    from dataclasses import replace

    shape = replace(synth.scaled(synth.PRESETS["deepseek-v2-lite"], 0.125, 27, 8), yarn=(40.0, 8))
    path = str(tmp_path / "d32.gguf")
    synth.synthesize(path, shape, name="d32", expert_quant="F32", dense_quant="F32", progress=False)
    assert_llamacpp_agrees(path)
