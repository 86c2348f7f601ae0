"""export_mixtral_gguf against oracles we did not write: transformers (GGUF de-permutation, the model's
own weights and logits), gguf-py (reader, quantisers) and llama.cpp (loads the file and runs it)."""

from __future__ import annotations

import os
import pathlib

import gguf
import llamacpp_oracle
import numpy as np
import pytest
from conftest import shared_vocab_dir
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from mixtral_factory import make_hf_mixtral, to_fused_layout
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from edgemoe.errors import ModelFormatError, UnsupportedError, UsageError
from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.formats.names import permute_qk, unpermute_qk

SPM_VOCAB = str((shared_vocab_dir() or pathlib.Path("/nonexistent")) / "ggml-vocab-llama-spm.gguf")
# transformers' GGUF loader undoes llama.cpp's Q/K permutation with this (n_head, n_head_kv) function.
_reverse_permute = LlamaTensorProcessor()._reverse_permute_weights


@pytest.fixture(scope="module")
def tiny():
    return make_hf_mixtral()


def _tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _expected(cfg: dict, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF name → the HF weight it holds (for Q/K: after transformers undoes the GGUF row permutation)."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf and not cfg["tie_word_embeddings"]:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"blk.{i}.attn_q.weight"] = hf[p + "self_attn.q_proj.weight"]
        out[f"blk.{i}.attn_k.weight"] = hf[p + "self_attn.k_proj.weight"]
        out[f"blk.{i}.attn_v.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[f"blk.{i}.attn_output.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[f"blk.{i}.ffn_gate_inp.weight"] = hf[p + "block_sparse_moe.gate.weight"]
        for gg, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            experts = [hf[p + f"block_sparse_moe.experts.{e}.{w}.weight"] for e in range(cfg["num_local_experts"])]
            out[f"blk.{i}.ffn_{gg}_exps.weight"] = np.stack(experts)  # (E, out, in)
    return out


def _undo_qk(name: str, data: np.ndarray, cfg: dict) -> np.ndarray:
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if ".attn_q." in name:
        return _reverse_permute(data, h, h)
    if ".attn_k." in name:
        return _reverse_permute(data, h, kv)
    return data


# --- Q/K permutation -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,n_kv,head_dim", [(4, 2, 16), (8, 8, 8), (32, 8, 128), (6, 1, 4), (2, 2, 2)])
def test_permute_matches_transformers(n_head, n_kv, head_dim):
    rng = np.random.default_rng(n_head * 100 + n_kv)
    wq = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
    wk = rng.standard_normal((n_kv * head_dim, 24)).astype(np.float32)
    bias = rng.standard_normal(n_kv * head_dim).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(wq, n_head), _reverse_permute(wq, n_head, n_head))
    np.testing.assert_array_equal(unpermute_qk(wk, n_kv), _reverse_permute(wk, n_head, n_kv))
    np.testing.assert_array_equal(_reverse_permute(permute_qk(wq, n_head), n_head, n_head), wq)
    np.testing.assert_array_equal(_reverse_permute(permute_qk(wk, n_kv), n_head, n_kv), wk)
    np.testing.assert_array_equal(_reverse_permute(permute_qk(bias, n_kv), n_head, n_kv), bias)
    if head_dim > 2:  # a permutation that is not the identity, so the checks above have teeth
        assert not np.array_equal(permute_qk(wq, n_head), wq)


# --- test helpers against transformers --------------------------------------------------------------


def test_fused_layout_is_transformers_state_dict(tiny):
    model, _, tensors = tiny
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in tensors  # save_pretrained: per expert
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # in memory: fused
    fused = to_fused_layout(tensors)
    assert fused.keys() == state.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(fused[k], v, err_msg=k)


# --- the file, read back with gguf-py ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_f32_tensors_and_metadata(tmp_path, tiny, layout):
    _, cfg, hf = tiny
    path = tmp_path / "m.gguf"
    export_mixtral_gguf(path, cfg, hf if layout == "per_expert" else to_fused_layout(hf))
    assert not os.path.exists(str(path) + ".tmp")

    expected = _expected(cfg, hf)
    got = _tensors(path)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        t = got[name]
        assert t.tensor_type == Q.F32, name
        assert tuple(int(n) for n in t.shape) == want.shape[::-1], name  # ggml order: (in, out, E)
        np.testing.assert_array_equal(_undo_qk(name, np.asarray(t.data), cfg), want, err_msg=name)

    r = GGUFReader(path)
    a = "llama."
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
    want_keys = {
        "block_count": 2, "context_length": 256, "embedding_length": 64, "feed_forward_length": 96,
        "attention.head_count": 4, "attention.head_count_kv": 2, "expert_count": 4, "expert_used_count": 2,
        "vocab_size": 128, "rope.dimension_count": 16,
    }
    for k, v in want_keys.items():
        assert _field(r, a + k) == v, k
    assert _field(r, a + "rope.freq_base") == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert _field(r, a + "attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert a + "attention.key_length" not in r.fields  # head_dim is null in config.json
    assert _field(r, "tokenizer.ggml.model") == "no_vocab"


def test_split_experts_tied_and_head_dim(tmp_path):
    # head_dim 32 ≠ 64 / 4; tied embeddings; older rope_theta key
    _, cfg, hf = make_hf_mixtral(head_dim=32, tie=True, seed=1)
    assert "lm_head.weight" not in hf
    cfg = {**cfg, "rope_theta": 5e5, "rope_parameters": None}
    path = tmp_path / "m.gguf"
    export_mixtral_gguf(path, cfg, hf, merged_experts=False)
    got = _tensors(path)
    expected = _expected(cfg, hf)
    for i in range(2):
        for gg in ("gate", "up", "down"):
            merged = expected.pop(f"blk.{i}.ffn_{gg}_exps.weight")
            for e in range(4):
                expected[f"blk.{i}.ffn_{gg}.{e}.weight"] = merged[e]
    assert got.keys() == expected.keys()
    assert "output.weight" not in got
    for name, want in expected.items():
        np.testing.assert_array_equal(_undo_qk(name, np.asarray(got[name].data), cfg), want, err_msg=name)
    r = GGUFReader(path)
    assert _field(r, "llama.attention.key_length") == 32
    assert _field(r, "llama.attention.value_length") == 32
    assert _field(r, "llama.rope.dimension_count") == 32
    assert _field(r, "llama.rope.freq_base") == pytest.approx(5e5)


def test_quantised_types_match_gguf_py(tmp_path, tiny):
    _, cfg, hf = tiny
    path = tmp_path / "m.gguf"
    # dense Q8_0 (rows of 64 fill 32-blocks); experts Q4_K cannot hold rows of 64/96 → F16, like the converter
    export_mixtral_gguf(path, cfg, hf, qtype="Q8_0", expert_qtype="Q4_K")
    got = _tensors(path)
    for name, want in _expected(cfg, hf).items():
        t = got[name]
        if want.ndim == 1 or "ffn_gate_inp" in name:
            want_type = Q.F32
        elif "_exps" in name:
            want_type = Q.F16
        else:
            want_type = Q.Q8_0
        assert t.tensor_type == want_type, name
        data = _undo_qk(name, np.asarray(t.data), cfg)  # whole rows move, so bytes can be de-permuted
        np.testing.assert_array_equal(
            data.view(np.uint8).reshape(want.shape[:-1] + (-1,)),
            np.asarray(gguf.quants.quantize(want, want_type)).view(np.uint8).reshape(want.shape[:-1] + (-1,)),
            err_msg=name,
        )
    assert _field(GGUFReader(path), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_S


def test_q4_k_experts_dequantise_close(tmp_path):
    _, cfg, hf = make_hf_mixtral(hidden=256, intermediate=256, layers=1, experts=2, top_k=1, seed=2)
    path = tmp_path / "m.gguf"
    export_mixtral_gguf(path, cfg, hf, qtype="F16", expert_qtype="Q4_K")
    got = _tensors(path)
    for name, want in _expected(cfg, hf).items():
        if "_exps" not in name:
            continue
        t = got[name]
        assert t.tensor_type == Q.Q4_K, name
        back = gguf.quants.dequantize(np.asarray(t.data), Q.Q4_K)  # (E, out, in)
        err = np.abs(back - want).max()
        assert err < 0.1 * np.abs(want).max(), (name, err)


def _write_vocab_gguf(path, n: int) -> None:
    """A vocab-only GGUF with gguf-py's writer: every value type the copy must keep, and invalid UTF-8."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([b"\xff\xfe"] + [f"tok{i}".encode() for i in range(1, n)])
    w.add_token_scores([float(-i) / 3 for i in range(n)])
    w.add_token_types([1 + i % 6 for i in range(n)])
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def test_tokenizer_keys_copied_verbatim(tmp_path, tiny):
    _, cfg, hf = tiny
    src_path, path = tmp_path / "vocab.gguf", tmp_path / "m.gguf"
    _write_vocab_gguf(src_path, cfg["vocab_size"])
    export_mixtral_gguf(path, cfg, hf, tokenizer_from=src_path)
    src, dst = GGUFReader(src_path), GGUFReader(path)
    keys = [k for k in src.fields if k.startswith("tokenizer.")]
    assert len(keys) == 9
    assert sorted(keys) == sorted(k for k in dst.fields if k.startswith("tokenizer."))
    for k in keys:
        a, b = src.fields[k], dst.fields[k]
        assert a.types == b.types, k
        assert [bytes(a.parts[i]) for i in a.data] == [bytes(b.parts[i]) for i in b.data], k
    with pytest.raises(ValueError, match="127 tokens"):
        _write_vocab_gguf(src_path, cfg["vocab_size"] - 1)
        export_mixtral_gguf(path, cfg, hf, tokenizer_from=src_path)


def test_rejections(tmp_path, tiny):
    _, cfg, hf = tiny
    path = tmp_path / "m.gguf"
    if os.path.exists(SPM_VOCAB):
        with pytest.raises(ValueError, match="32000 tokens"):
            export_mixtral_gguf(path, cfg, hf, tokenizer_from=SPM_VOCAB)  # vocab 128
    with pytest.raises(ModelFormatError, match="GGUF"):
        export_mixtral_gguf(path, cfg, hf, tokenizer_from=__file__)
    with pytest.raises(UnsupportedError, match="Q6_K"):
        export_mixtral_gguf(path, cfg, hf, expert_qtype="Q6_K")
    with pytest.raises(UnsupportedError, match="Q3_K"):  # loadable, but edgemoe has no quantiser for it
        export_mixtral_gguf(path, cfg, hf, qtype="Q3_K")
    with pytest.raises(UsageError, match="Q9_K"):
        export_mixtral_gguf(path, cfg, hf, qtype="Q9_K")
    with pytest.raises(ModelFormatError, match="unexpected tensors"):
        export_mixtral_gguf(path, cfg, {**hf, "model.extra.weight": np.zeros(3, np.float32)})
    missing = dict(hf)
    del missing["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(ModelFormatError, match="experts.2.w3"):
        export_mixtral_gguf(path, cfg, missing)
    assert not os.listdir(tmp_path)  # neither the file nor its .tmp


# --- llama.cpp runs the exported file ---------------------------------------------------------------

try:
    import llama_cpp
except (ImportError, OSError, RuntimeError):  # not installed, or its shared library does not load
    llama_cpp = None


def _hf_run(model, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """transformers' logits for `ids` (T, V) and its greedy continuation of `n` tokens."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
        seq = list(ids)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return logits, seq[len(ids):]


def _vocab_tests(path: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors: (text, ids without BOS), as test-tokenizer-0 reads them."""
    with open(path + ".inp", encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(path + ".out", encoding="utf-8") as f:
        ids = [[int(t) for t in line.split()] for line in f.read().split("\n")]
    return list(zip(texts, ids))


@pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not installed")
@pytest.mark.parametrize("qtype,vocab", [("F32", "spm"), ("F32", None), ("Q8_0", "spm")])
def test_llama_cpp_matches_transformers(tmp_path, qtype, vocab):
    if vocab == "spm" and not os.path.exists(SPM_VOCAB):
        pytest.skip(f"{SPM_VOCAB} not present")
    n_vocab = 32000 if vocab == "spm" else 128
    model, cfg, hf = make_hf_mixtral(vocab=n_vocab, seed=3)
    if vocab is None:  # also the fused layout, straight from transformers' in-memory state dict
        hf = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path / f"m-{qtype}.gguf"
    export_mixtral_gguf(path, cfg, hf, qtype=qtype, tokenizer_from=SPM_VOCAB if vocab else None)
    llm = llamacpp_oracle.load(path)

    ids = [t % n_vocab for t in (1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203)]
    want, want_greedy = _hf_run(model, ids, 16)
    got, greedy = llamacpp_oracle.run(llm, ids, 16)
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    if qtype == "F32":
        assert err <= 1e-3 * scale, f"max |llama.cpp - transformers| = {err:.3g}, logits scale {scale:.3g}"
        assert greedy == want_greedy
    else:
        # llama.cpp also rounds activations to Q8_0; measured ~2% (a wrong tensor map gives > 100%)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 0.05 and err < 0.1 * scale, f"relative error {rel:.3g}, max {err:.3g} of {scale:.3g}"
    if vocab == "spm":  # the copied vocabulary works in llama.cpp's tokenizer
        for text, want_ids in _vocab_tests(SPM_VOCAB)[:40]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want_ids, repr(text)
