"""The expert activations against torch's: SwiGLU (Mixtral and most families) and gpt-oss's clamped SwiGLU as
transformers' GptOssExperts computes it; the parallel and serial twins give the same bits, on rows whose width
is not a multiple of the 8-lane vectors too."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.kernels import ops

torch = pytest.importorskip("torch")

ALPHA, LIMIT = 1.702, 7.0


def rows(T: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((T, n)) * 6).astype(np.float32)  # past ±limit often
    up = (rng.standard_normal((T, n)) * 6).astype(np.float32)
    gate[0, :3] = [-90.0, 0.0, 200.0]  # exp's clamped range, zero, far above the limit
    return gate, up


def gpt_oss_torch(gate, up, gate_b, up_b) -> np.ndarray:
    """transformers' GptOssExperts: gate.clamp(max=limit), up.clamp(±limit), (up + 1) * gate * sigmoid(gate * alpha)."""
    g = (torch.from_numpy(gate) + torch.from_numpy(gate_b)).clamp(min=None, max=LIMIT)
    u = (torch.from_numpy(up) + torch.from_numpy(up_b)).clamp(min=-LIMIT, max=LIMIT)
    return ((u + 1) * (g * torch.sigmoid(g * ALPHA))).numpy()


@pytest.mark.parametrize("n", [8, 37, 1440])
def test_clamped_swiglu_matches_transformers(n):
    gate, up = rows(5, n, n)
    rng = np.random.default_rng(1)
    gate_b, up_b = (rng.standard_normal(n) * 2).astype(np.float32), (rng.standard_normal(n) * 2).astype(np.float32)
    want = gpt_oss_torch(gate, up, gate_b, up_b)
    outs = []
    for twin in ops.CLAMPED_SWIGLU:
        out = np.empty_like(gate)
        twin(out, gate, 0, up, 0, n, gate_b, up_b, ALPHA, LIMIT)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], want, rtol=3e-6, atol=1e-30)


@pytest.mark.parametrize("n", [8, 37, 1440])
def test_swiglu_matches_torch(n):
    gate, up = rows(4, n, n + 1)
    want = (torch.nn.functional.silu(torch.from_numpy(gate)) * torch.from_numpy(up)).numpy()
    outs = []
    for twin in ops.SWIGLU:
        out = np.empty_like(gate)
        twin(out, gate, 0, up, 0, n)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], want, rtol=3e-6, atol=1e-30)
