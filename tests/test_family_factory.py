"""family_factory: tiny random qwen3_moe / qwen2_moe / olmoe / mixtral models round-trip through save_pretrained,
and llama.cpp's own converter turns them into GGUF files whose architecture, layer-0 tensors (names, shapes,
values) and metadata are pinned here. The sdist holding the converter is cached in ~/.cache/edgemoe-test-convert;
the GGUF checks are skipped when it is not cached and cannot be downloaded."""

from __future__ import annotations

import subprocess
import tarfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import family_factory as ff  # noqa: E402
from llamacpp_sdist import SDIST  # noqa: E402

FAMILIES = ff.FAMILIES
H, KV, I_EXP, I_DENSE, E = 64, 32, 48, 96, 4  # defaults of make_hf_moe: hidden, kv_heads·head_dim, widths, experts

ATTN = {"attn_norm.weight": [H], "attn_q.weight": [H, H], "attn_k.weight": [H, KV], "attn_v.weight": [H, KV],
        "attn_output.weight": [H, H], "ffn_norm.weight": [H]}
EXPERTS = {"ffn_gate_inp.weight": [H, E], "ffn_gate_exps.weight": [H, I_EXP, E], "ffn_up_exps.weight": [H, I_EXP, E],
           "ffn_down_exps.weight": [I_EXP, H, E]}
# layer 0 of each converted model: GGUF tensor name → ne (GGUF order: fastest dimension first)
LAYER0 = {
    "qwen3_moe": {**ATTN, **EXPERTS, "attn_q_norm.weight": [16], "attn_k_norm.weight": [16]},
    "qwen2_moe": {**ATTN, **EXPERTS, "attn_q.bias": [H], "attn_k.bias": [KV], "attn_v.bias": [KV],
                  "ffn_gate_shexp.weight": [H, I_DENSE], "ffn_up_shexp.weight": [H, I_DENSE],
                  "ffn_down_shexp.weight": [I_DENSE, H], "ffn_gate_inp_shexp.weight": [H, 1]},
    "olmoe": {**ATTN, **EXPERTS, "attn_q_norm.weight": [H], "attn_k_norm.weight": [KV]},
    "mixtral": {**ATTN, **EXPERTS},
}
COMMON = {"block_count": 2, "context_length": 256, "embedding_length": H, "attention.head_count": 4,
          "attention.head_count_kv": 2, "expert_count": E, "expert_used_count": 2}
# every architecture-prefixed key the converter writes, with its value (there is no norm_top_k_prob / clamp key)
ARCH_KV = {
    "qwen3_moe": {**COMMON, "feed_forward_length": I_DENSE, "expert_feed_forward_length": I_EXP,
                  "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-6, "attention.key_length": 16,
                  "attention.value_length": 16},
    "qwen2_moe": {**COMMON, "feed_forward_length": I_DENSE, "expert_feed_forward_length": I_EXP,
                  "expert_shared_feed_forward_length": I_DENSE, "rope.freq_base": 1e6,
                  "attention.layer_norm_rms_epsilon": 1e-6},
    "olmoe": {**COMMON, "feed_forward_length": I_EXP, "rope.freq_base": 1e4, "attention.layer_norm_rms_epsilon": 1e-5},
    "mixtral": {**COMMON, "feed_forward_length": I_EXP, "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-5,
                "vocab_size": 128, "rope.dimension_count": 16},
}
OTHER_KEYS = {"general.architecture", "general.type", "general.name", "general.size_label", "general.file_type",
              "general.quantization_version", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
              "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_eos_token", "tokenizer.chat_template"}
VARIANT = dict(head_dim=24, moe_intermediate=64, norm_topk_prob=False)  # converted to q8_0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family → (model, cfg, HF directory), plus "dense" (qwen3_moe with layer 0 dense) and "variant"."""
    out = {}
    for key, family, kw in [*((f, f, {}) for f in FAMILIES), ("dense", "qwen3_moe", {"dense_layers": (0,)}),
                            ("variant", "qwen3_moe", VARIANT)]:
        model, cfg = ff.make_hf_moe(family, **kw)
        out[key] = (model, cfg, ff.save_hf(model, cfg, tmp_path_factory.mktemp(key)))
    return out


@pytest.fixture(scope="module")
def converted(built):
    """key → GGUFReader of the converted file (or the ConversionError), all converted in one process."""
    try:
        ff.converter_dir()
    except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as e:
        pytest.skip(f"llama.cpp's converter is not cached in {ff.CONVERT_CACHE} and could not be fetched ({SDIST}): {e}")

    jobs = [(d, f"{d}/out.gguf", "q8_0" if key == "variant" else "f32") for key, (_, _, d) in built.items()]
    return {key: res if isinstance(res, Exception) else gguf.GGUFReader(res)
            for key, res in zip(built, ff.convert_many(jobs))}


def _arrays(reader) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in reader.tensors}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip(built, family):
    model, cfg, d = built[family]
    again = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(again) is type(model) and again.config.model_type == family
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.tensor([[1, 5, 9, 77, 3, 100, 125, 127]])
    with torch.no_grad():
        a = model(ids).logits
        torch.testing.assert_close(again(ids).logits, a, rtol=0, atol=1e-5)
        # Loaded weights live in the safetensors mmap, at addresses BLAS may treat differently in the last bit
        # (qwen2_moe's 1-row shared-expert gate does); copied into fresh memory the logits are identical.
        for p in again.parameters():
            p.data = p.data.clone()
        assert torch.equal(again(ids).logits, a)
    assert float(a.std()) > 0.1  # random, not degenerate
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert len(tok) == cfg["vocab_size"] == 128
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (125, 127, 125)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (125, 127)
    text = "hello world, the router picks 2 experts.\n"
    assert tok.decode(tok.encode(text)) == text and 125 not in tok.encode(text)
    assert tok.encode("<|im_start|>user")[0] == 126


def test_options():
    m, cfg = ff.make_hf_moe("qwen3_moe", dense_layers=(1,), layers=3, norm_topk_prob=False, head_dim=24)
    assert [type(layer.mlp).__name__ for layer in m.model.layers] == ["Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP",
                                                                      "Qwen3MoeSparseMoeBlock"]
    assert (cfg["mlp_only_layers"], cfg["norm_topk_prob"], cfg["head_dim"]) == ([1], False, 24)
    _, cfg = ff.make_hf_moe("qwen3_moe")
    assert cfg["norm_topk_prob"] is True and not cfg["use_sliding_window"] and cfg["rope_parameters"]["rope_theta"] == 1e6
    m, cfg = ff.make_hf_moe("qwen2_moe", shared_expert=32)
    assert cfg["shared_expert_intermediate_size"] == 32 and cfg["qkv_bias"] and cfg["norm_topk_prob"] is False
    assert m.model.layers[0].self_attn.q_proj.bias.abs().min() > 0  # biases random too
    _, cfg = ff.make_hf_moe("olmoe", clip_qkv=2.5, norm_topk_prob=True)
    assert (cfg["clip_qkv"], cfg["norm_topk_prob"], cfg["rms_norm_eps"]) == (2.5, True, 1e-5)
    for family, kw in [("qwen2_moe", {"shared_expert": False}), ("olmoe", {"dense_layers": (0,)}),
                       ("olmoe", {"head_dim": 8}), ("mixtral", {"norm_topk_prob": False}), ("qwen3_moe", {"clip_qkv": 1}),
                       ("deepseek", {})]:
        with pytest.raises(ValueError):
            ff.make_hf_moe(family, **kw)
    tok = ff.make_tokenizer(300)
    assert tok.get_vocab_size() == 300 and tok.decode(tok.encode("é€").ids) == "é€"  # all 256 bytes, then merges


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_layout(built, converted, family):
    r = converted[family]
    assert not isinstance(r, Exception), r
    model, cfg, d = built[family]
    arch = ff.GGUF_ARCH[family]
    assert r.fields["general.architecture"].contents() == arch
    layer0 = {t.name.removeprefix("blk.0."): [int(n) for n in t.shape] for t in r.tensors if t.name.startswith("blk.0.")}
    assert layer0 == LAYER0[family]
    top = {t.name: [int(n) for n in t.shape] for t in r.tensors if not t.name.startswith("blk.")}
    assert top == {"token_embd.weight": [H, 128], "output_norm.weight": [H], "output.weight": [H, 128]}
    assert {t.tensor_type for t in r.tensors} == {gguf.GGMLQuantizationType.F32}
    keys = {k for k in r.fields if not k.startswith("GGUF.")}
    assert keys == OTHER_KEYS | {f"{arch}.{k}" for k in ARCH_KV[family]}
    for k, v in ARCH_KV[family].items():
        assert r.fields[f"{arch}.{k}"].contents() == pytest.approx(v, rel=1e-6), k
    f = {k: r.fields[k].contents() for k in OTHER_KEYS - {"tokenizer.ggml.token_type", "tokenizer.ggml.merges"}}
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tok = ff.make_tokenizer(128)
    assert f["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(128)]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"],
            f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_eos_token"]) == (125, 127, 125, False, False)
    assert f["tokenizer.chat_template"] == ff.CHATML and f["general.file_type"] == 0

    # values: tensor for tensor what the HF model holds; Q/K rows permuted for llama only
    sd = {k.removeprefix("model.layers.0."): v.numpy() for k, v in model.state_dict().items()}
    g = {k.removeprefix("blk.0."): v for k, v in _arrays(r).items() if k.startswith("blk.0.")}
    q, k = sd["self_attn.q_proj.weight"], sd["self_attn.k_proj.weight"]
    if family == "mixtral":
        q, k = _permute(q, 4), _permute(k, 2)
        assert not np.array_equal(g["attn_q.weight"], sd["self_attn.q_proj.weight"])
    gate_up = sd["mlp.experts.gate_up_proj"]
    want = {"attn_q.weight": q, "attn_k.weight": k, "attn_v.weight": sd["self_attn.v_proj.weight"],
            "attn_output.weight": sd["self_attn.o_proj.weight"], "attn_norm.weight": sd["input_layernorm.weight"],
            "ffn_norm.weight": sd["post_attention_layernorm.weight"], "ffn_gate_inp.weight": sd["mlp.gate.weight"],
            "ffn_gate_exps.weight": gate_up[:, :I_EXP], "ffn_up_exps.weight": gate_up[:, I_EXP:],
            "ffn_down_exps.weight": sd["mlp.experts.down_proj"]}
    for hf, name in [("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight"),
                     ("mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"),
                     ("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
                     ("mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"),
                     ("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"),
                     *((f"self_attn.{x}_proj.bias", f"attn_{x}.bias") for x in "qkv")]:
        if hf in sd:
            want[name] = sd[hf]
    assert want.keys() == g.keys()
    for name, w in want.items():
        np.testing.assert_array_equal(g[name], w, err_msg=name)
    np.testing.assert_array_equal(_arrays(r)["token_embd.weight"], sd["model.embed_tokens.weight"])


def test_dense_layers_are_not_convertible(converted):
    """qwen2moe / qwen3moe have no ffn_gate/ffn_up/ffn_down in llama.cpp's tensor list: mlp_only_layers fail."""
    e = converted["dense"]
    assert isinstance(e, ff.ConversionError)
    assert "Can not map tensor 'model.layers.0.mlp.down_proj.weight'" in str(e)


def test_q8_0_and_explicit_head_dim(built, converted):
    r = converted["variant"]
    assert not isinstance(r, Exception), r
    fields = {k: r.fields[k].contents() for k in ("general.file_type", "qwen3moe.attention.key_length",
                                                   "qwen3moe.expert_feed_forward_length")}
    assert fields == {"general.file_type": 7, "qwen3moe.attention.key_length": 24,
                      "qwen3moe.expert_feed_forward_length": 64}
    types = {t.name.removeprefix("blk.0."): (t.tensor_type.name, [int(n) for n in t.shape])
             for t in r.tensors if t.name.startswith("blk.0.")}
    assert types == {"attn_norm.weight": ("F32", [H]), "attn_q.weight": ("Q8_0", [H, 96]),
                     "attn_k.weight": ("Q8_0", [H, 48]), "attn_v.weight": ("Q8_0", [H, 48]),
                     "attn_output.weight": ("Q8_0", [96, H]), "attn_q_norm.weight": ("F32", [24]),
                     "attn_k_norm.weight": ("F32", [24]), "ffn_norm.weight": ("F32", [H]),
                     "ffn_gate_inp.weight": ("F32", [H, E]), "ffn_gate_exps.weight": ("Q8_0", [H, 64, E]),
                     "ffn_up_exps.weight": ("Q8_0", [H, 64, E]), "ffn_down_exps.weight": ("Q8_0", [64, H, E])}
    model = built["variant"][0]
    deq = gguf.dequantize(r.tensors[[t.name for t in r.tensors].index("blk.0.attn_q.weight")].data,
                          gguf.GGMLQuantizationType.Q8_0)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(deq.reshape(q.shape), q, atol=np.abs(q).max() / 100)
