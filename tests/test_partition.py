"""`edgemoe partition` against oracles we did not write: gguf-py (reader, quantisers, the source file's bytes),
transformers (the HF weights and its GGUF Q/K de-permutation) and the `crc32c` package (checksums of the file
bytes; zlib for a format 1 manifest)."""

from __future__ import annotations

import json
import os
import zlib

import crc32c
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from mixtral_factory import make_hf_mixtral, to_fused_layout
from safetensors.numpy import save_file
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import edgemoe.pack.layout as layout_mod
import edgemoe.pack.stream as stream_mod
from edgemoe.cli import main as cli_main
from edgemoe.default_model import vocabulary, write_vocab
from edgemoe.errors import EdgeMoEError
from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.loader import load_model
from edgemoe.partition import manifest_path, partition, read_manifest, verify_pack
from edgemoe.tokenizer import load_tokenizer

ALIGN = 4096
PROJS = ("gate", "up", "down")
HF_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
IDS = np.array([1, 7, 42, 3, 99, 5])
_reverse_permute = LlamaTensorProcessor()._reverse_permute_weights  # transformers' undo of llama.cpp's Q/K order


@pytest.fixture(scope="module")
def tiny():
    return make_hf_mixtral(hidden=64, intermediate=96, layers=2, experts=4, seed=5)


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    """GGUF sources (merged F32, merged Q8_0/Q4_0, per-expert Q8_0) and HF directories (both expert layouts)."""
    _, cfg, hf = tiny
    d = tmp_path_factory.mktemp("src")
    out = {}
    for name, kw in {"f32": dict(qtype="F32"), "q4_0": dict(qtype="Q8_0", expert_qtype="Q4_0"),
                     "split_q8_0": dict(qtype="Q8_0", merged_experts=False)}.items():
        out[name] = str(d / f"{name}.gguf")
        export_mixtral_gguf(out[name], cfg, hf, **kw)
    for name, tensors in (("hf_split", hf), ("hf_fused", to_fused_layout(hf))):
        os.makedirs(d / name)
        with open(d / name / "config.json", "w") as f:
            json.dump(cfg, f)
        save_file(tensors, str(d / name / "model.safetensors"))
        out[name] = str(d / name)
    return out


def _tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _bytes(t) -> bytes:
    return np.asarray(t.data).tobytes()


def _logits(path) -> np.ndarray:
    m = load_model(str(path)).model
    return m.forward(IDS, m.new_cache(16), all_logits=True)  # (T, V)


def _check_layout(pack: str, manifest: dict, n_layers: int, n_experts: int) -> None:
    """Alignment, dense-first order, gate/up/down adjacency, parts, and checksums against crc32c on the file bytes."""
    reader = GGUFReader(pack)
    assert reader.alignment == ALIGN
    assert reader.fields["edgemoe.pack.version"].contents() == 2
    assert manifest["format_version"] == 2 and manifest["checksum"] == "crc32c"
    data = open(pack, "rb").read()
    assert manifest["pack_bytes"] == len(data)
    by_offset = sorted(reader.tensors, key=lambda t: t.data_offset)
    is_expert = [".ffn_gate." in t.name or ".ffn_up." in t.name or ".ffn_down." in t.name for t in by_offset]
    n_dense = is_expert.index(True)
    assert all(is_expert[n_dense:]), "a dense tensor sits among the experts"
    want_order = [f"blk.{i}.ffn_{p}.{e}.weight" for i in range(n_layers) for e in range(n_experts) for p in PROJS]
    assert [t.name for t in by_offset[n_dense:]] == want_order
    tensors = {t.name: t for t in reader.tensors}
    entries = manifest["experts"]
    assert [(x["layer"], x["expert"]) for x in entries] == [(i, e) for i in range(n_layers) for e in range(n_experts)]
    for x in entries:
        start, length = x["byte_offset"], x["byte_length"]
        assert start % ALIGN == 0
        used = 0
        prev_end = start
        for p in PROJS:
            t = tensors[f"blk.{x['layer']}.ffn_{p}.{x['expert']}.weight"]
            part = x["parts"][p]
            assert t.data_offset == start + part["offset"]
            assert t.data_offset % ALIGN == 0
            assert t.data_offset - prev_end < ALIGN  # adjacent: only alignment padding in between
            assert part["length"] == t.n_bytes and part["quantization"] == t.tensor_type.name
            assert [part["cols"], part["rows"]] == [int(n) for n in t.shape]
            prev_end = t.data_offset + int(t.n_bytes)
            used += part["length"]
        assert x["parts"]["gate"]["offset"] == 0 and prev_end == start + length
        assert x["alignment_padding"] == length - used
        assert data[start + length : start + length + (-length % ALIGN)] == bytes(-length % ALIGN)
        assert x["checksum"] == f"{crc32c.crc32c(data[start : start + length]):08x}"


# --- GGUF sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["f32", "q4_0", "split_q8_0"])
def test_gguf_source_copied_byte_for_byte(sources, tmp_path, src):
    pack = str(tmp_path / "m.pack.gguf")
    manifest = partition(sources[src], pack, progress=False)
    assert os.path.exists(manifest_path(pack)) and read_manifest(pack) == manifest
    _check_layout(pack, manifest, 2, 4)
    assert sorted(os.listdir(tmp_path)) == ["m.pack.gguf", "m.pack.manifest.json"]  # no temporary files left

    got, want = _tensors(pack), _tensors(sources[src])
    for name, t in want.items():
        if "_exps." in name:  # merged (E, out, in) → one tensor per expert
            raw = np.asarray(t.data)
            for e in range(raw.shape[0]):
                g = got[name.replace("_exps.", f".{e}.")]
                assert g.tensor_type == t.tensor_type and _bytes(g) == raw[e].tobytes(), (name, e)
        else:
            assert got[name].tensor_type == t.tensor_type and _bytes(got[name]) == _bytes(t), name
    assert len(got) == len(want) + (3 * 2 * 3 if src != "split_q8_0" else 0)

    src_fields, pack_fields = GGUFReader(sources[src]).fields, GGUFReader(pack).fields
    for key, f in src_fields.items():
        if not key.startswith("GGUF."):
            assert [bytes(f.parts[i]) for i in f.data] == [bytes(pack_fields[key].parts[i])
                                                           for i in pack_fields[key].data], key
    assert manifest["quantization"]["experts"] == {{"f32": "F32", "q4_0": "Q4_0"}.get(src, "Q8_0"): 24}
    np.testing.assert_array_equal(_logits(pack), _logits(sources[src]))
    assert verify_pack(pack) == []


def test_gguf_q4_k_experts_copied(tmp_path):
    _, cfg, hf = make_hf_mixtral(hidden=256, intermediate=256, layers=1, experts=2, top_k=1, seed=2)
    src, pack = str(tmp_path / "s.gguf"), str(tmp_path / "p.gguf")
    export_mixtral_gguf(src, cfg, hf, qtype="Q8_0", expert_qtype="Q4_K")
    manifest = partition(src, pack, progress=False)
    assert manifest["quantization"]["experts"] == {"Q4_K": 6}
    want = np.asarray(_tensors(src)["blk.0.ffn_down_exps.weight"].data)
    assert _bytes(_tensors(pack)["blk.0.ffn_down.1.weight"]) == want[1].tobytes()
    _check_layout(pack, manifest, 1, 2)
    np.testing.assert_array_equal(_logits(pack), _logits(src))


def test_gguf_requantised_on_request(sources, tmp_path):
    pack = str(tmp_path / "p.gguf")
    manifest = partition(sources["q4_0"], pack, quant="Q8_0", dense_quant="F16", progress=False)
    assert manifest["quantization"] == {"dense": {"F16": 10, "F32": 7}, "experts": {"Q8_0": 24}}
    got, src = _tensors(pack), _tensors(sources["q4_0"])
    merged = np.asarray(src["blk.1.ffn_up_exps.weight"].data)  # (E, out, row_bytes) Q4_0
    back = gguf.quants.dequantize(merged[2], Q.Q4_0)
    assert _bytes(got["blk.1.ffn_up.2.weight"]) == gguf.quants.quantize(back, Q.Q8_0).tobytes()
    q = gguf.quants.dequantize(np.asarray(src["blk.0.attn_q.weight"].data), Q.Q8_0)  # stays in GGUF row order
    assert _bytes(got["blk.0.attn_q.weight"]) == q.astype(np.float16).tobytes()
    assert _bytes(got["blk.0.ffn_gate_inp.weight"]) == _bytes(src["blk.0.ffn_gate_inp.weight"])  # router kept
    assert GGUFReader(pack).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    _check_layout(pack, manifest, 2, 4)


# --- HF sources -------------------------------------------------------------------------------------


def _hf_expected(cfg: dict, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pack tensor name → the HF weight it must hold (Q/K still in GGUF order)."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({f"blk.{i}.attn_norm.weight": hf[p + "input_layernorm.weight"],
                    f"blk.{i}.attn_q.weight": hf[p + "self_attn.q_proj.weight"],
                    f"blk.{i}.attn_k.weight": hf[p + "self_attn.k_proj.weight"],
                    f"blk.{i}.attn_v.weight": hf[p + "self_attn.v_proj.weight"],
                    f"blk.{i}.attn_output.weight": hf[p + "self_attn.o_proj.weight"],
                    f"blk.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
                    f"blk.{i}.ffn_gate_inp.weight": hf[p + "block_sparse_moe.gate.weight"]})
        for e in range(cfg["num_local_experts"]):
            for proj, w in HF_PROJ.items():
                out[f"blk.{i}.ffn_{proj}.{e}.weight"] = hf[p + f"block_sparse_moe.experts.{e}.{w}.weight"]
    return out


def _undo_qk(name: str, rows: np.ndarray, cfg: dict) -> np.ndarray:
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if ".attn_q." in name:
        return _reverse_permute(rows, h, h)
    if ".attn_k." in name:
        return _reverse_permute(rows, h, kv)
    return rows


@pytest.mark.parametrize("layout", ["hf_split", "hf_fused"])
def test_hf_source_float(sources, tiny, tmp_path, layout):
    _, cfg, hf = tiny
    pack = str(tmp_path / "p.gguf")
    manifest = partition(sources[layout], pack, progress=False)
    _check_layout(pack, manifest, 2, 4)
    got = _tensors(pack)
    expected = _hf_expected(cfg, hf)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert got[name].tensor_type == Q.F32, name
        np.testing.assert_array_equal(_undo_qk(name, np.asarray(got[name].data), cfg), want, err_msg=name)
    np.testing.assert_array_equal(_logits(pack), _logits(sources[layout]))
    assert GGUFReader(pack).fields["tokenizer.ggml.model"].contents() == "no_vocab"


def test_hf_source_quantised(sources, tiny, tmp_path):
    _, cfg, hf = tiny
    pack = str(tmp_path / "p.gguf")
    manifest = partition(sources["hf_split"], pack, quant="Q4_0", dense_quant="Q8_0", progress=False)
    assert manifest["quantization"] == {"dense": {"Q8_0": 10, "F32": 7}, "experts": {"Q4_0": 24}}
    got = _tensors(pack)
    for name, want in _hf_expected(cfg, hf).items():
        t = got[name]
        want_type = Q.F32 if want.ndim == 1 or "ffn_gate_inp" in name else Q.Q4_0 if ".ffn_" in name else Q.Q8_0
        assert t.tensor_type == want_type, name
        rows = _undo_qk(name, np.asarray(t.data).view(np.uint8).reshape(want.shape[0], -1), cfg)  # whole rows move
        oracle = np.asarray(gguf.quants.quantize(want, want_type)).view(np.uint8).reshape(want.shape[0], -1)
        np.testing.assert_array_equal(rows, oracle, err_msg=name)
    rel = np.linalg.norm(_logits(pack) - _logits(sources["hf_split"])) / np.linalg.norm(_logits(sources["hf_split"]))
    assert rel < 0.25  # 4-bit experts on a random model: measured ~0.1; a wrong tensor map gives ~1


def test_hf_vocab_from(tmp_path):
    vocab = str(tmp_path / "vocab.gguf")
    write_vocab(vocab)
    _, cfg, hf = make_hf_mixtral(vocab=len(vocabulary()[0]), layers=1, seed=3)
    src = tmp_path / "hf"
    os.makedirs(src)
    (src / "config.json").write_text(json.dumps(cfg))
    save_file(hf, str(src / "model.safetensors"))
    pack = str(tmp_path / "p.gguf")
    partition(str(src), pack, vocab_from=vocab, progress=False)
    tok = load_model(pack).tokenizer
    assert tok is not None and tok.encode("the king") == load_tokenizer(vocab).encode("the king")


# --- integrity --------------------------------------------------------------------------------------


def _as_format_1(pack: str) -> dict:
    """Rewrite a pack's manifest as a format 1 pack has it: zlib CRC-32 checksums, no other change."""
    m = read_manifest(pack)
    data = open(pack, "rb").read()
    m["format_version"], m["checksum"] = 1, "crc32"
    for x in m["experts"]:
        x["checksum"] = f"{zlib.crc32(data[x['byte_offset']:x['byte_offset'] + x['byte_length']]):08x}"
    with open(manifest_path(pack), "w") as f:
        json.dump(m, f)
    return m


def test_format_1_pack_still_verified(sources, tmp_path):
    """A pack written before CRC-32C (format 1, zlib CRC-32) loads, streams with every read checked, and a flipped
    byte in it is still found, by verify_pack and by the streaming reader."""
    from edgemoe.experts.read_jobs import ChecksumError
    from edgemoe.experts.setup import StreamOptions

    pack = str(tmp_path / "p.gguf")
    partition(sources["q4_0"], pack, progress=False)
    model = load_model(pack).model
    want = model.forward(np.array([1, 2, 3]), model.new_cache(8))
    m = _as_format_1(pack)
    assert verify_pack(pack) == []
    loaded = load_model(pack, StreamOptions.from_budget(0.01))
    assert loaded.model.experts.reader.checksum_algorithm == "crc32" and loaded.model.experts.checksums
    np.testing.assert_array_equal(loaded.model.forward(np.array([1, 2, 3]), loaded.model.new_cache(8)), want)
    loaded.model.experts.close()
    x = m["experts"][1]
    with open(pack, "r+b") as f:
        f.seek(x["byte_offset"] + 100)
        b = f.read(1)
        f.seek(x["byte_offset"] + 100)
        f.write(bytes([b[0] ^ 1]))
    assert any("checksum" in p for p in verify_pack(pack))
    store = load_model(pack, StreamOptions.from_budget(0.01)).model.experts
    with pytest.raises(ChecksumError):
        store.get(x["layer"], x["expert"])
    store.close()
    m["checksum"] = "md5"
    with open(manifest_path(pack), "w") as f:
        json.dump(m, f)
    with pytest.raises(EdgeMoEError, match="checksum 'md5'"):
        read_manifest(pack)


def test_verify_detects_a_flipped_byte(sources, tmp_path):
    pack = str(tmp_path / "p.gguf")
    manifest = partition(sources["q4_0"], pack, progress=False)
    assert verify_pack(pack) == []
    x = manifest["experts"][5]
    at = x["byte_offset"] + x["parts"]["up"]["offset"] + 17
    with open(pack, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    problems = verify_pack(pack)
    assert len(problems) == 1 and "layer 1, expert 1" in problems[0] and "checksum" in problems[0], problems
    with open(pack, "r+b") as f:
        f.truncate(os.path.getsize(pack) - ALIGN)
    assert any("bytes" in p for p in verify_pack(pack))
    os.remove(manifest_path(pack))
    assert len(verify_pack(pack)) == 1 and "no manifest" in verify_pack(pack)[0]


class _Interrupt(Exception):
    pass


def test_interrupted_write_leaves_no_pack(sources, tmp_path, monkeypatch):
    pack = str(tmp_path / "p.gguf")
    calls = {"n": 0}
    real_update = stream_mod.update

    def failing_update(algorithm, crc, data):
        calls["n"] += 1
        if calls["n"] == 20:  # inside the experts
            raise _Interrupt()
        return real_update(algorithm, crc, data)

    monkeypatch.setattr(stream_mod, "update", failing_update)
    with pytest.raises(_Interrupt):
        partition(sources["q4_0"], pack, progress=False)
    assert calls["n"] == 20
    assert os.listdir(tmp_path) == []


def test_crash_between_renames_leaves_no_manifest(sources, tmp_path, monkeypatch):
    pack = str(tmp_path / "p.gguf")
    partition(sources["f32"], pack, progress=False)  # an older, complete pack at the same names
    old = open(pack, "rb").read()
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith(".manifest.json"):
            raise _Interrupt()
        real_replace(src, dst)

    monkeypatch.setattr(layout_mod.os, "replace", replace)
    with pytest.raises(_Interrupt):
        partition(sources["q4_0"], pack, progress=False)
    assert open(pack, "rb").read() != old
    assert not os.path.exists(manifest_path(pack))  # the old manifest never describes the new pack
    assert sorted(os.listdir(tmp_path)) == ["p.gguf"]


# --- command line -----------------------------------------------------------------------------------


def test_cli(sources, tmp_path, capsys):
    pack = str(tmp_path / "p.gguf")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inference:\n  quantization: Q8_0\n")
    assert cli_main(["partition", sources["f32"], "-o", pack, "--config", str(cfg), "-q", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "verified 8 expert checksums" in out
    assert read_manifest(pack)["quantization"]["experts"] == {"Q8_0": 24}
    assert cli_main(["partition", sources["f32"], "-o", pack, "--config", str(cfg), "--quant", "F16", "-q"]) == 0
    assert read_manifest(pack)["quantization"]["experts"] == {"F16": 24}  # the flag overrides the file


def _bad_arch_gguf(path) -> None:
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("x", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["missing", "not_a_model", "bad_quant", "no_out_dir", "same_file", "arch",
                                  "bad_config", "vocab_for_gguf"])
def test_cli_bad_input(sources, tmp_path, capsys, case):
    src, out = sources["f32"], str(tmp_path / "p.gguf")
    extra: list[str] = []
    if case == "missing":
        src = str(tmp_path / "nope.gguf")
    elif case == "not_a_model":
        src = str(tmp_path / "x.txt")
        open(src, "w").write("hello")
    elif case == "bad_quant":
        extra = ["--quant", "Q3_K"]
    elif case == "no_out_dir":
        out = str(tmp_path / "no" / "p.gguf")
    elif case == "same_file":
        out = src
    elif case == "arch":
        src = str(tmp_path / "gpt2.gguf")
        _bad_arch_gguf(src)
    elif case == "bad_config":
        (tmp_path / "c.yaml").write_text("partition_typo: 1\n")
        extra = ["--config", str(tmp_path / "c.yaml")]
    elif case == "vocab_for_gguf":
        extra = ["--vocab-from", src]
    before = sorted(os.listdir(tmp_path))
    assert cli_main(["partition", src, "-o", out, "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemoe: error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_hf_bf16_kept(tiny, tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    _, cfg, hf = tiny
    src = tmp_path / "hf"
    os.makedirs(src)
    (src / "config.json").write_text(json.dumps(cfg))
    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in hf.items()}, str(src / "model.safetensors"))
    pack = str(tmp_path / "p.gguf")
    manifest = partition(str(src), pack, progress=False)
    assert manifest["quantization"] == {"dense": {"BF16": 10, "F32": 7}, "experts": {"BF16": 24}}
    got = _tensors(pack)
    bits = torch.from_numpy(hf["model.layers.1.block_sparse_moe.experts.3.w2.weight"]).to(torch.bfloat16)
    assert _bytes(got["blk.1.ffn_down.3.weight"]) == bits.view(torch.int16).numpy().tobytes()
    router = torch.from_numpy(hf["model.layers.0.block_sparse_moe.gate.weight"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(got["blk.0.ffn_gate_inp.weight"].data), router)  # widened exactly
    np.testing.assert_allclose(_logits(pack), _logits(str(src)), rtol=1e-4, atol=1e-4)


def test_streaming_reader_sees_one_range_per_expert(sources, tmp_path):
    """The engine's own extent finder and checksum-verifying reader agree with the manifest."""
    from edgemoe.experts.extents import gguf_extents
    from edgemoe.experts.setup import StreamOptions

    pack = str(tmp_path / "p.gguf")
    manifest = partition(sources["q4_0"], pack, progress=False)
    extents = gguf_extents(_tensors(pack), 2, 4)
    for x in manifest["experts"]:
        ext = extents[x["layer"]][x["expert"]]
        assert ext.ranges == ((x["byte_offset"], x["byte_length"]),)
        assert {p: ext.parts[p].offset for p in PROJS} == {p: x["parts"][p]["offset"] for p in PROJS}
    m = load_model(pack, StreamOptions.from_budget(0.02, verify_checksums=True)).model  # ~20 kB: evictions
    try:
        streamed = m.forward(IDS, m.new_cache(16), all_logits=True)
    finally:
        m.experts.close()
    np.testing.assert_array_equal(streamed, _logits(sources["q4_0"]))


def test_release_pages_keeps_data(tmp_path):
    path = tmp_path / "x.bin"
    want = np.arange(3 * 4096 + 100, dtype=np.uint8)
    want.tofile(path)
    m = np.memmap(path, dtype=np.uint8, mode="r")
    view = np.asarray(m[4000:9000]).reshape(50, 100)  # a plain ndarray whose base is the memmap
    stream_mod.release_pages(view)
    np.testing.assert_array_equal(view.reshape(-1), want[4000:9000])
    stream_mod.release_pages(np.zeros(10, np.uint8))  # not mapped: nothing to do
