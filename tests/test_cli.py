"""The command line: generation output, and one clear line + exit code 2 for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from edgemoe.cli import main
from edgemoe.default_model import write_vocab


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_json(capsys, model_gguf):
    code, out, err = run_cli(capsys, "run", "-m", model_gguf, "-p", "the king", "-n", "6", "--temp", "0", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_ids"][0] == 1 and len(r["token_ids"]) == 6
    assert len(r["top_logprobs"]) == 6 and all(len(s) == 5 for s in r["top_logprobs"])
    # Greedy: the chosen token is the most likely one at each step.
    assert [s[0]["id"] for s in r["top_logprobs"]] == r["token_ids"]
    assert r["timings"]["prefill_tok_s"] > 0 and r["timings"]["decode_tok_s"] > 0


def test_run_streams_text_and_speed(capsys, model_gguf):
    code, out, err = run_cli(capsys, "run", "-m", model_gguf, "--prompt-ids", "1,5,9", "-n", "5", "--seed", "3")
    assert code == 0
    assert out.endswith("\n") and "tok/s" in err


def test_seed_reproducible(capsys, model_gguf):
    args = ("run", "-m", model_gguf, "-p", "the sea", "-n", "8", "--seed", "7", "--json")
    a = json.loads(run_cli(capsys, *args)[1])["token_ids"]
    b = json.loads(run_cli(capsys, *args)[1])["token_ids"]
    assert a == b


def _write_gguf(path, arch="llama", tensor_type=GGMLQuantizationType.F32, experts=4):
    w = GGUFWriter(str(path), arch)
    width = 64 if tensor_type == GGMLQuantizationType.F32 else 256  # one block of any type
    for k, v in {"embedding_length": width, "block_count": 1, "feed_forward_length": 96,
                 "attention.head_count": 4, "attention.head_count_kv": 2, "context_length": 64,
                 "expert_used_count": 2, "vocab_size": 32}.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_uint32(f"{arch}.expert_count", experts)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    x = np.ones((1, 64), np.float32)
    if tensor_type == GGMLQuantizationType.F32:
        w.add_tensor("blk.0.attn_norm.weight", x[0])
    else:
        x = np.ones((1, width), np.float32)
        w.add_tensor("blk.0.attn_norm.weight", quantize(x, tensor_type)[0], raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def bad_inputs(tmp, model):
    text = tmp / "notes.txt"
    text.write_text("hello")
    trunc = tmp / "trunc.gguf"
    trunc.write_bytes(open(model, "rb").read()[: os.path.getsize(model) // 2])
    empty_dir = tmp / "empty"
    empty_dir.mkdir()
    return {
        "missing path": (["-m", str(tmp / "nope.gguf"), "-p", "x"], "no such file"),
        "not a model": (["-m", str(text), "-p", "x"], "neither a GGUF file"),
        "dir without config": (["-m", str(empty_dir), "-p", "x"], "no config.json"),
        "truncated": (["-m", str(trunc), "-p", "x"], "truncated or corrupt"),
        "unknown arch": (["-m", _write_gguf(tmp / "a.gguf", arch="bert"), "-p", "x"], "architecture bert"),
        "dense llama": (["-m", _write_gguf(tmp / "d.gguf", experts=0), "-p", "x"], "dense"),
        "tensor type": (["-m", _write_gguf(tmp / "q.gguf", tensor_type=GGMLQuantizationType.TQ2_0), "--prompt-ids",
                         "1"], "TQ2_0 is not supported"),
        "context": (["-m", model, "--prompt-ids", ",".join(["5"] * 60), "-n", "8", "--ctx", "32"], "context"),
        "bad ids": (["-m", model, "--prompt-ids", "1,x"], "comma-separated"),
        "id range": (["-m", model, "--prompt-ids", "1,99999"], "outside the vocabulary"),
        "top-p": (["-m", model, "-p", "x", "--top-p", "1.5"], "--top-p"),
        "n": (["-m", model, "-p", "x", "-n", "0"], "-n must be"),
    }


def test_bad_input_one_line_exit_2(capsys, tmp_path, model_gguf):
    for name, (argv, needle) in bad_inputs(tmp_path, model_gguf).items():
        code, out, err = run_cli(capsys, "run", *argv)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgemoe: error:"), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_console_script_no_traceback_and_debug(tmp_path):
    cmd = [sys.executable, "-m", "edgemoe", "run", "-m", str(tmp_path / "missing.gguf")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such file" in r.stderr
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_tokenize_vocab_only(capsys, tmp_path):
    vocab = tmp_path / "v.gguf"
    write_vocab(str(vocab))
    code, out, _ = run_cli(capsys, "tokenize", "-m", str(vocab), "--json", "the king")
    assert code == 0
    r = json.loads(out)
    assert r["pieces"] == ["<s>", "▁the", "▁king"]
