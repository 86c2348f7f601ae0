"""gpt-oss checkpoints as released: the experts in MXFP4 (`*_blocks` + `*_scales`, quantization_config mxfp4).

A random GptOssForCausalLM gets random MXFP4 experts: random E2M1 codes and E8M0 scales, dequantised by
transformers' own MXFP4 code (integrations.mxfp4.convert_moe_packed_tensors, what transformers runs when it loads
such a checkpoint on a CPU) into the reference model's float experts; the checkpoint saved holds the blocks and
scales in their place, as the released ones do. Then:
- every expert the loader builds dequantises to transformers' values exactly, and its bytes are the rows
  llama.cpp's converter writes for the same checkpoint;
- edgemoe's logits on the checkpoint agree with transformers' and with llama.cpp's on the converter's file
  within the 8-bit activation rounding of the MXFP4 kernels, the same top token wherever it is clear.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from family_factory import ConversionError, convert_many, make_hf_gpt_oss, save_hf  # noqa: E402
from reference_runs import hf_logits  # noqa: E402

from edgemoe.formats.safetensors import SafetensorsIndex  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402
from edgemoe.models import gpt_oss  # noqa: E402
from edgemoe.quants import dequantize_qtensor  # noqa: E402

IDS = [1, 45, 99, 7, 120, 3, 64, 18, 100, 11, 77, 50]
E, D, I, LAYERS = 4, 128, 64, 2
EXPERTS = "model.layers.{i}.mlp.experts."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model with the dequantised experts, checkpoint directory, {name: blocks/scales},
    converter's GGUF path or None)."""
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model, cfg = make_hf_gpt_oss(hidden=D, intermediate=I, experts=E, layers=LAYERS, seed=31, yarn=False)
    rng = np.random.default_rng(31)
    packed = {}
    for i, layer in enumerate(model.model.layers):
        for proj, rows, cols in (("gate_up_proj", 2 * I, D), ("down_proj", D, I)):
            blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 125, (E, rows, cols // 32), dtype=np.uint8)  # weights up to 6 * 2**-3
            w = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
            getattr(layer.mlp.experts, proj).data.copy_(w)  # (E, cols, rows): x @ W
            packed[EXPERTS.format(i=i) + proj + "_blocks"] = blocks
            packed[EXPERTS.format(i=i) + proj + "_scales"] = scales
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    d = save_hf(model, cfg, root / "hf")
    tensors = load_file(f"{d}/model.safetensors")
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            del tensors[name]
    save_file({**tensors, **packed}, f"{d}/model.safetensors", metadata={"format": "pt"})
    conf = json.loads(open(f"{d}/config.json").read())
    conf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    open(f"{d}/config.json", "w").write(json.dumps(conf))
    gguf_path = root / "converted.gguf"
    try:
        done = convert_many([(d, gguf_path, "f32")])[0]
    except (OSError, ConversionError):  # the converter could not be had (offline, no cache)
        done = None
    assert not isinstance(done, ConversionError), done
    return model, d, packed, done and str(gguf_path)


def test_experts_are_transformers_values_and_the_converters_bytes(checkpoint):
    model, d, _, gguf_path = checkpoint
    args = load_model(d).args
    idx = SafetensorsIndex(d)
    reader = None
    if gguf_path is not None:
        from gguf import GGUFReader

        reader = {t.name: np.asarray(t.data) for t in GGUFReader(gguf_path).tensors}
    for i, layer in enumerate(model.model.layers):
        experts = gpt_oss.hf_experts(idx, args, i, lambda n: n)
        gate_up = layer.mlp.experts.gate_up_proj.detach().numpy()  # (E, D, 2I), gate and up interleaved
        down = layer.mlp.experts.down_proj.detach().numpy()  # (E, I, D)
        for e, ex in enumerate(experts):
            assert ex.gate.qtype.name == "MXFP4"
            assert np.array_equal(dequantize_qtensor(ex.gate), gate_up[e, :, 0::2].T)
            assert np.array_equal(dequantize_qtensor(ex.up), gate_up[e, :, 1::2].T)
            assert np.array_equal(dequantize_qtensor(ex.down), down[e].T)
            if reader is not None:
                for part, qt in (("gate", ex.gate), ("up", ex.up), ("down", ex.down)):
                    assert np.array_equal(reader[f"blk.{i}.ffn_{part}_exps.weight"][e], qt.data), (i, e, part)
    assert reader is not None or pytest.skip("llama.cpp's converter is not available: bytes not compared")


def close_with_clear_top(got, want, rel_max):
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= rel_max, f"relative L2 difference {rel:.3g}"
    scale = np.abs(want).max()
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.1 * scale
    assert clear.sum() >= 2  # the check must have positions to bite on
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


def engine_logits(path) -> np.ndarray:
    m = load_model(str(path)).model
    return m.forward(np.asarray(IDS), m.new_cache(64, "f32"), all_logits=True)  # (T, V)


def test_logits_agree_with_transformers(checkpoint):
    model, d, *_ = checkpoint
    close_with_clear_top(engine_logits(d), hf_logits(model, IDS), 4e-2)


def test_logits_agree_with_llama_cpp_on_the_converted_file(checkpoint):
    llamacpp_oracle = pytest.importorskip("llamacpp_oracle")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[bench]')")
    _, d, _, gguf_path = checkpoint
    if gguf_path is None:
        pytest.skip("llama.cpp's converter is not available")
    want, _ = llamacpp_oracle.run(llamacpp_oracle.load(gguf_path), IDS, 1)
    close_with_clear_top(engine_logits(d), want, 4e-2)


def edited_copy(d: str, tmp_path, config=None, tensors=None) -> str:
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(d, out)
    if config is not None:
        conf = json.loads((out / "config.json").read_text())
        config(conf)
        (out / "config.json").write_text(json.dumps(conf))
    if tensors is not None:
        t = load_file(str(out / "model.safetensors"))
        tensors(t)
        save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("what", ["other-quantisation", "scales-cut"])
def test_what_cannot_load_is_one_line(checkpoint, tmp_path, capsys, what):
    from edgemoe.cli import main

    _, d, *_ = checkpoint
    name = EXPERTS.format(i=1) + "down_proj_scales"
    if what == "other-quantisation":
        bad, needle = edited_copy(d, tmp_path, config=lambda c: c["quantization_config"].update(quant_method="gptq")), \
            "quantised as"
    else:
        bad, needle = edited_copy(d, tmp_path, tensors=lambda t: t.update({name: t[name][:, :-1]})), name
    code = main(["run", "-m", bad, "--prompt-ids", "1,2", "-n", "2"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("edgemoe: loading ")]
    assert code == 2 and len(err) == 1 and needle in err[0], err
