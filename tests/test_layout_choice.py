"""The weight layout, and so the output, does not depend on the free memory at start: only on the model, the
config (`compute.repack`) and the machine's memory."""

from __future__ import annotations

import collections

import numpy as np
import psutil
import pytest
from mixtral_factory import make_hf_mixtral

from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.loader import load_model


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    _, cfg, tensors = make_hf_mixtral(hidden=128, intermediate=256, layers=2, experts=4, vocab=96, seed=8)
    path = tmp_path_factory.mktemp("layout") / "m.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype="Q8_0", expert_qtype="Q4_0")
    return str(path)


def greedy(model, n=12):
    cache = model.new_cache(32)
    logits = model.forward(np.asarray([1, 5, 9]), cache)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.asarray(out[-1:]), cache)[-1]
    return out


def test_free_memory_does_not_change_the_layout_or_the_tokens(q4_model, monkeypatch):
    plenty = load_model(q4_model).model
    real = psutil.virtual_memory()
    vm = collections.namedtuple("vm", real._fields)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(*[1 << 20 if f == "available" else getattr(real, f)
                                                              for f in real._fields]))
    scarce = load_model(q4_model).model  # 1 MB "free": the old rule left the experts plain here
    assert plenty.layout == scarce.layout == "interleaved dense, interleaved experts"
    assert greedy(plenty) == greedy(scarce)


def test_repack_off_keeps_the_plain_layout(q4_model):
    model = load_model(q4_model, repack=False).model
    assert model.layout == "plain dense, plain experts"
    assert all(e.gate_up is None for e in (model.experts.get(0, i) for i in range(4)))


@pytest.mark.parametrize("expert_qtype", ["Q4_1", "Q5_0", "Q5_1", "MXFP4"])
def test_interleaved_legacy_experts_agree_with_plain(expert_qtype, tmp_path):
    """Q4_1/Q5_0/Q5_1 experts (llama.cpp's fallback types for widths not a multiple of 256) and MXFP4 ones take
    their 8-row layout, stacked gate|up included: the logits are the plain layout's up to summation order."""
    _, cfg, tensors = make_hf_mixtral(hidden=128, intermediate=256, layers=2, experts=4, vocab=96, seed=9)
    path = tmp_path / "m.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype="Q8_0", expert_qtype=expert_qtype)
    x8 = load_model(str(path)).model
    plain = load_model(str(path), repack=False).model
    e = x8.experts.get(0, 0)
    assert e.gate_up is not None and e.gate_up.interleave == 8 and e.down.interleave == 8
    ids = np.asarray([1, 5, 9, 33, 2])
    a = x8.forward(ids, x8.new_cache(16))
    b = plain.forward(ids, plain.new_cache(16))
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
