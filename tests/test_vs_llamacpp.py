"""End-to-end GGUF behaviour against llama.cpp (through llama-cpp-python, when installed: `pip install '.[bench]'`).

Same file, same token ids. F32: logits within 1e-4 × scale and identical greedy continuations. Block types:
both engines round activations to 8 bits, but not with identical arithmetic, so each lands about 2 % (relative
L2) from the float model and about as far from the other; the check is that they agree to within that noise
and pick the same top token wherever the choice is clear.
"""

from __future__ import annotations

import llamacpp_oracle
import numpy as np
import pytest
from llamacpp_oracle import engine_run
from mixtral_factory import make_hf_mixtral

from edgemoe.formats.gguf_export import export_mixtral_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[bench]')")

IDS = [1, 45, 99, 7, 120, 3, 64, 18, 200, 11, 77, 150]
CASES = {  # dense type, expert type, tolerance: max |Δ| / scale for F32, relative L2 for block types
    "F32": ("F32", "F32", 1e-4),
    "Q8_0": ("Q8_0", "Q8_0", 4e-2),
    "Q4_0": ("Q8_0", "Q4_0", 4e-2),
    "Q4_K": ("Q8_0", "Q4_K", 4e-2),
}


def llama_run(path, ids, n):
    return llamacpp_oracle.run(llamacpp_oracle.load(path), ids, n)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_llama_cpp(case, tmp_path):
    dense, experts, tol = CASES[case]
    _, cfg, tensors = make_hf_mixtral(hidden=256, intermediate=512, heads=4, kv_heads=2, experts=4, top_k=2,
                                      vocab=256, seed=11)
    path = tmp_path / f"{case}.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype=dense, expert_qtype=experts)
    want, want_greedy = llama_run(path, IDS, 16)
    got, greedy = engine_run(path, IDS, 16)
    scale = np.abs(want).max()
    if case == "F32":
        err = np.abs(got - want).max()
        assert err <= tol * scale, f"max |edgemoe - llama.cpp| = {err:.3g}, logits scale {scale:.3g}"
        assert greedy == want_greedy
        return
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= tol, f"relative L2 difference {rel:.3g}"
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * scale
    assert clear.sum() >= 3  # the check must have positions to bite on
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
