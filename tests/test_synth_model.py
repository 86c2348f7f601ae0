"""tools/synth_model.py: its files load and run in the engine, and gguf-py's dequantiser (the oracle) sees
weights of the intended scale: per-row std ≈ 1/sqrt(cols), mean ≈ 0."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from edgemoe.cli import main as cli_main
from edgemoe.loader import load_model
from edgemoe.partition import read_manifest, verify_pack

_TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "synth_model.py")


@pytest.fixture(scope="module")
def synth():
    spec = importlib.util.spec_from_file_location("synth_model", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_files(synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    out = {}
    for name, argv in {"q4_0": [], "q4_k_f16": ["--expert-quant", "Q4_K", "--dense-quant", "F16"],
                       "packed": ["--packed", "--expert-quant", "Q4_K"]}.items():
        out[name] = str(d / f"{name}.gguf")
        assert synth.main(["tiny", "-o", out[name], "-q", *argv]) == 0
    return out


def test_main_prints_size_and_time(synth, tmp_path, capsys):
    path = str(tmp_path / "m.gguf")
    assert synth.main(["tiny", "-o", path, "-q", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and " GB in " in out and os.listdir(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("which,expert_type,dense_type", [("q4_0", Q.Q4_0, Q.Q8_0), ("q4_k_f16", Q.Q4_K, Q.F16),
                                                          ("packed", Q.Q4_K, Q.Q8_0)])
def test_weight_scale(tiny_files, which, expert_type, dense_type):
    reader = GGUFReader(tiny_files[which])
    types = {t.name: t.tensor_type for t in reader.tensors}
    checked = 0
    for t in reader.tensors:
        if t.name.endswith("norm.weight"):
            np.testing.assert_array_equal(np.asarray(t.data), 1.0)
            continue
        want = Q.F32 if "ffn_gate_inp" in t.name else expert_type if ".ffn_" in t.name else dense_type
        assert t.tensor_type == want, t.name
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # (..., cols)
        cols = x.shape[-1]
        rows = x.reshape(-1, cols)
        assert abs(rows.std() * np.sqrt(cols) - 1) < 0.05, t.name
        assert abs(rows.mean() * np.sqrt(cols)) < 0.05, t.name
        row_std = rows.std(axis=1) * np.sqrt(cols)
        assert 0.7 < row_std.min() and row_std.max() < 1.3, t.name
        checked += 1
    assert checked == len(types) - 2 * 2 - 1  # all but the norms


def test_vocab_and_shape_metadata(tiny_files):
    r = GGUFReader(tiny_files["q4_0"])
    n_tokens = len(r.fields["tokenizer.ggml.tokens"].data)
    assert r.fields["llama.vocab_size"].contents() == n_tokens
    assert {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}["token_embd.weight"] == (256, n_tokens)
    assert r.fields["llama.expert_count"].contents() == 8
    assert r.fields["llama.attention.head_count_kv"].contents() == 2


@pytest.mark.parametrize("which", ["q4_0", "q4_k_f16", "packed"])
def test_engine_runs_it(tiny_files, capsys, which):
    code = cli_main(["run", "-m", tiny_files[which], "--prompt-ids", "1,2,3", "-n", "4", "--temp", "0", "--json"])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    m = load_model(tiny_files[which]).model
    logits = m.forward(np.array([1, 2, 3]), m.new_cache(8), all_logits=True)  # (T, V)
    assert np.isfinite(logits).all() and 0.2 < logits.std() < 5  # activations stay O(1)


def test_packed_is_a_verified_pack(tiny_files):
    manifest = read_manifest(tiny_files["packed"])
    assert len(manifest["experts"]) == 2 * 8 and manifest["source_format"] == "synthetic"
    assert all(x["byte_offset"] % 4096 == 0 for x in manifest["experts"])
    assert verify_pack(tiny_files["packed"]) == []


def test_same_seed_same_bytes(synth, tmp_path):
    a, b, c = (str(tmp_path / f"{n}.gguf") for n in "abc")
    shape = synth.scaled(synth.PRESETS["tiny"], layers=1)
    for path, seed in ((a, 0), (b, 0), (c, 1)):
        synth.synthesize(path, shape, name="t", seed=seed, progress=False)
    data = [open(p, "rb").read() for p in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2] and len(data[0]) == len(data[2])


def test_scaled_shapes(synth):
    q = synth.scaled(synth.PRESETS["qwen3-30b-a3b"], 0.25)
    assert (q.hidden, q.intermediate, q.heads, q.kv_heads, q.head_dim, q.experts, q.top_k, q.layers) == \
        (512, 256, 8, 1, 128, 128, 8, 48)
    o = synth.scaled(synth.PRESETS["olmoe-1b-7b"], layers=4)
    assert (o.hidden, o.intermediate, o.heads, o.kv_heads, o.layers) == (2048, 1024, 16, 16, 4)
    m = synth.PRESETS["mixtral-8x7b"]
    assert (m.hidden, m.intermediate, m.experts, m.top_k, m.layers) == (4096, 14336, 8, 2, 32)
    with pytest.raises(ValueError):
        synth.scaled(m, 0)
