"""Crafted and corrupt model files: each is refused with one line naming the field or tensor (exit 2),
before any kernel runs; none crashes, hangs or prints a traceback, and none runs silently wrong.

The base file is the shipped draft model (a real 2-layer Mixtral GGUF with a vocabulary); each case edits
its image (tests/gguf_image.py) the way an attacker or a broken converter would.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf_image import GGUFImage

from edgemoe.cli import main as cli_main
from edgemoe.default_model import draft_model_path

U32, I32, F32, STR, U64 = T.UINT32, T.INT32, T.FLOAT32, T.STRING, T.UINT64


@pytest.fixture(scope="module")
def base() -> GGUFImage:
    return GGUFImage.read(draft_model_path())


def run_cli(capsys, path: str, *extra: str) -> tuple[int, str]:
    prompt = ["--prompt-ids", "1,5,9"] if os.path.isdir(path) else ["-p", "the king said"]
    rc = cli_main(["run", "-m", path, *prompt, "-n", "3", "--temp", "0", *extra])
    err = capsys.readouterr().err
    return rc, err


def assert_refused(capsys, path: str, words: str) -> None:
    rc, err = run_cli(capsys, path)
    # a load slower than the progress threshold (a busy box) prints its phase first: not part of the refusal
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("edgemoe: loading ")]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error:"), err
    assert words in lines[0], lines[0]


def _output_norm_at_end(im: GGUFImage) -> None:  # 16 floats at the very end of the file: the norm reads 128
    t = im.tensor("output_norm.weight")
    t.dims = [16]
    t.offset = len(im.data) - 64


def _later_layer_dims(im: GGUFImage) -> None:
    im.tensor("blk.1.attn_q.weight").dims = [128, 96]


def _expert_offset_past_end(im: GGUFImage) -> None:
    im.tensor("blk.1.ffn_down_exps.weight").offset = len(im.data) - 1024


def _unknown_type(im: GGUFImage) -> None:
    im.tensor("blk.0.attn_v.weight").ggml_type = 99


def _unsupported_type(im: GGUFImage) -> None:  # a real type edgemoe does not compute with (fewer bytes than Q8_0)
    im.tensor("blk.0.attn_v.weight").ggml_type = Q.IQ4_NL


def _drop_tensor(name: str):
    def edit(im: GGUFImage) -> None:
        im.tensors = [t for t in im.tensors if t.name != name.encode()]
    return edit


CASES = {  # id → (edit of the image, words the one-line error must contain)
    "head_count 0": (lambda im: im.set("llama.attention.head_count", U32, 0), "num_attention_heads"),
    "rope freq_base 0": (lambda im: im.set("llama.rope.freq_base", F32, 0.0), "rope_theta"),
    "rope freq_base nan": (lambda im: im.set("llama.rope.freq_base", F32, float("nan")), "rope_theta"),
    "eps negative": (lambda im: im.set("llama.attention.layer_norm_rms_epsilon", F32, -1.0), "rms_norm_eps"),
    "expert_used_count 0": (lambda im: im.set("llama.expert_used_count", U32, 0), "num_experts_per_tok"),
    "expert_used_count 2**32-1": (lambda im: im.set("llama.expert_used_count", U32, 2**32 - 1), "num_experts_per_tok"),
    "expert_used_count 100": (lambda im: im.set("llama.expert_used_count", U32, 100), "num_experts_per_tok"),
    "5 experts used of 4": (lambda im: im.set("llama.expert_used_count", U32, 5), "num_experts_per_tok"),
    "expert_used_count negative": (lambda im: im.set("llama.expert_used_count", I32, -1), "num_experts_per_tok"),
    "architecture not UTF-8": (lambda im: im.set("general.architecture", STR, b"ll\xffama"), "general.architecture"),
    "architecture a number": (lambda im: im.set("general.architecture", U32, 7), "general.architecture"),
    "block_count a string": (lambda im: im.set("llama.block_count", STR, b"2"), "num_hidden_layers"),
    "block_count 1 of 2 layers": (lambda im: im.set("llama.block_count", U32, 1), "block_count"),
    "block_count 3 of 2 layers": (lambda im: im.set("llama.block_count", U32, 3), "blk.2"),
    "embedding_length wrong": (lambda im: im.set("llama.embedding_length", U32, 256), "shape"),
    "feed_forward_length missing": (lambda im: im.drop("llama.feed_forward_length"), "intermediate_size"),
    "vocabulary shorter than the embedding": (
        lambda im: im.set("tokenizer.ggml.tokens", T.ARRAY, (STR, im.kv("tokenizer.ggml.tokens").value[1][:-1])),
        "vocabulary"),
    "eos id outside the vocabulary": (lambda im: im.set("tokenizer.ggml.eos_token_id", U32, 50000), "eos"),
    "output_norm 16 floats at the end": (_output_norm_at_end, "output_norm.weight"),
    "wrong dims in a later layer": (_later_layer_dims, "blk.1.attn_q.weight"),
    "expert tensor past the end": (_expert_offset_past_end, "truncated or corrupt"),
    "unknown tensor type": (_unknown_type, "GGMLQuantizationType"),
    "unsupported tensor type": (_unsupported_type, "blk.0.attn_v.weight"),
    "an expert tensor missing": (_drop_tensor("blk.1.ffn_up_exps.weight"), "blk.1.ffn_up_exps.weight"),
    "an attention tensor missing": (_drop_tensor("blk.0.attn_k.weight"), "blk.0.attn_k.weight"),
    "rope scaling": (lambda im: im.set("llama.rope.scaling.type", STR, b"yarn"), "rope scaling"),
    "rope freq_base an array": (lambda im: im.set("llama.rope.freq_base", T.ARRAY, (U32, [1, 2, 3])),
                                "llama.rope.freq_base"),
    "a foreign tensor": (lambda im: im.tensors.append(type(im.tensors[0])(b"rope_freqs.weight", [32], 0, 0)),
                         "rope_freqs.weight"),
    "output head without its bytes": (_drop_tensor("output.weight"), "belong to no tensor"),
    "a norm stored as F16 in F32 bytes": (lambda im: setattr(im.tensor("blk.0.ffn_norm.weight"), "ggml_type", 1),
                                          "belong to no tensor"),
    "two tensors at one offset": (lambda im: setattr(im.tensor("blk.1.attn_k.weight"), "offset",
                                                     im.tensor("blk.1.attn_v.weight").offset), "tensor table is corrupt"),
    "a misaligned tensor": (lambda im: setattr(im.tensor("blk.1.attn_k.weight"), "offset",
                                               im.tensor("blk.1.attn_k.weight").offset + 2), "aligned"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_gguf_is_refused_with_one_line(case, base, tmp_path, capsys):
    edit, words = CASES[case]
    im = GGUFImage.read(draft_model_path())
    edit(im)
    path = str(tmp_path / "bad.gguf")
    im.write(path)
    assert_refused(capsys, path, words)


def test_the_unedited_image_runs(tmp_path, capsys):
    """The cases above fail because of their edit, not because of the image writer."""
    path = str(tmp_path / "same.gguf")
    GGUFImage.read(draft_model_path()).write(path)
    rc, err = run_cli(capsys, path)
    assert rc == 0, err


@pytest.mark.parametrize("cut", [100, 5000, -4096, -1])
def test_truncated_gguf_is_refused(cut, tmp_path, capsys):
    src = draft_model_path()
    size = os.path.getsize(src)
    path = str(tmp_path / "cut.gguf")
    with open(src, "rb") as f, open(path, "wb") as g:
        g.write(f.read(cut if cut > 0 else size + cut))
    assert_refused(capsys, path, "")


def test_nan_weights_are_an_error_not_tokens(tmp_path, capsys):
    """NaN in a quantised matrix (a Q8_0 block scale) reaches the logits: the run stops with a clear error."""
    im = GGUFImage.read(draft_model_path())
    t = im.tensor("blk.0.attn_output.weight")
    assert t.ggml_type == Q.Q8_0
    for row in range(t.dims[1]):  # every row's first block scale (f16) → NaN
        at = t.offset + row * (t.dims[0] // 32) * 34
        im.data[at:at + 2] = struct.pack("<H", 0x7E00)
    path = str(tmp_path / "nan.gguf")
    im.write(path)
    rc, err = run_cli(capsys, path)
    assert rc == 2, err
    assert "NaN or infinite logits" in err and "Traceback" not in err


def test_nan_in_a_norm_is_refused_at_load(tmp_path, capsys):
    im = GGUFImage.read(draft_model_path())
    t = im.tensor("blk.1.ffn_norm.weight")
    im.data[t.offset:t.offset + 4] = np.float32(np.nan).tobytes()
    path = str(tmp_path / "nan-norm.gguf")
    im.write(path)
    assert_refused(capsys, path, "NaN")


def test_missing_output_head_ties_like_llama_cpp_and_says_so(tmp_path, capsys, caplog):
    """llama.cpp uses the token embedding when a llama-architecture file has no output.weight; so does
    edgemoe, and it says so."""
    im = GGUFImage.read(draft_model_path())
    im.remove_tensor("output.weight")
    path = str(tmp_path / "tied.gguf")
    im.write(path)
    rc, err = run_cli(capsys, path)
    assert rc == 0, err
    assert "output.weight" in caplog.text + err


def test_a_fifo_is_refused_at_once(tmp_path, capsys):
    path = str(tmp_path / "model.gguf")
    os.mkfifo(path)
    assert_refused(capsys, path, "not a regular file")


# ----------------------------------------------------------------------------------------- HF directories

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from mixtral_factory import make_hf_mixtral

    d = tmp_path_factory.mktemp("hf")
    hf, cfg, tensors = make_hf_mixtral(vocab=300, hidden=64, layers=2)
    hf.save_pretrained(d)
    return str(d)


def _hf_variant(hf_dir: str, tmp_path, edit) -> str:
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    raw = (d / "config.json").read_bytes()
    (d / "config.json").write_bytes(edit(raw))
    return str(d)


def _cfg_edit(**changes):
    def edit(raw: bytes) -> bytes:
        cfg = json.loads(raw)
        cfg.update(changes)
        return json.dumps(cfg).encode()
    return edit


HF_CASES = {
    "list-rooted config": (lambda raw: b"[" + raw + b"]", "not an object"),
    "config not UTF-8": (lambda raw: raw.replace(b'"mixtral"', b'"mixtr\xffal"'), "config.json"),
    "config not JSON": (lambda raw: raw[: len(raw) // 2], "config.json"),
    "config nested 100000 deep": (lambda raw: b"[" * 100000 + b"]" * 100000, "config.json"),
    "a 5000-digit integer": (lambda raw: raw.replace(b'"hidden_size": 64', b'"hidden_size": ' + b"9" * 5000),
                             "config.json"),
    "hidden_size a string": (_cfg_edit(hidden_size="64"), "hidden_size"),
    "experts per token a float": (_cfg_edit(num_experts_per_tok=2.0), "num_experts_per_tok"),
    "heads 0": (_cfg_edit(num_attention_heads=0), "num_attention_heads"),
    "rope_theta Infinity": (lambda raw: raw.replace(b'"rope_theta":', b'"rope_theta": Infinity, "x":'), "rope_theta"),
    "rope scaling yarn": (_cfg_edit(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    "intermediate_size wrong": (_cfg_edit(intermediate_size=128), "shape"),
    "num_hidden_layers 1 of 2": (_cfg_edit(num_hidden_layers=1), "num_hidden_layers"),
    "num_key_value_heads missing": (lambda raw: json.dumps({k: v for k, v in json.loads(raw).items()
                                                            if k != "num_key_value_heads"}).encode(),
                                    "num_key_value_heads"),
    "tie without saying so": (_cfg_edit(tie_word_embeddings=False), None),  # lm_head present: must still run
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_crafted_hf_config_is_refused_with_one_line(case, hf_dir, tmp_path, capsys):
    edit, words = HF_CASES[case]
    path = _hf_variant(hf_dir, tmp_path, edit)
    if words is None:
        rc, err = run_cli(capsys, path)
        assert rc == 0, err
        return
    assert_refused(capsys, path, words)


def test_hf_missing_lm_head_is_an_error_unless_tied(hf_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "untied"
    shutil.copytree(hf_dir, d)
    for fn in d.glob("*.safetensors"):
        t = load_file(str(fn))
        t.pop("lm_head.weight", None)
        save_file(t, str(fn), metadata={"format": "pt"})
    assert_refused(capsys, str(d), "lm_head.weight")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = run_cli(capsys, str(d))
    assert rc == 0, err
