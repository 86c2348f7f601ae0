"""Pieces every architecture shares: linear layers on QTensors and the grouped expert layer.

Legend: T = tokens in the step, D = hidden size, I = expert intermediate size,
E = experts in the layer, A = experts active per token.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..experts.store import ExpertStore
from ..kernels import ops
from ..qtensor import QTensor


def linear(x: np.ndarray, w: QTensor) -> np.ndarray:
    """x @ W.T on quantised W.   x: (T, in) → (T, out)"""
    out = np.empty((x.shape[0], w.rows), dtype=np.float32)  # (T, out)
    if x.shape[0] == 1:
        kernels.matvec(out[0], w, x[0])
    else:
        kernels.matmul(out, w, x)
    return out


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)  # (T, D)
    ops.rmsnorm(out, x, w, eps)
    return out


def switch_glu(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
               experts: ExpertStore, layer: int, fn=None) -> np.ndarray:
    """Σ_a weight[t, a] · expert[ids[t, a]](x[t]), computing each expert once for all its tokens.

    Each token sums its experts' outputs in increasing expert id, whatever the other tokens of the
    step are, so a token's result does not depend on its batch.
    x: (T, D); expert_ids, expert_weights: (T, A) → (T, D)
    """
    T, _ = x.shape
    out = np.zeros_like(x)  # (T, D)
    run = fn or (lambda x, ex, e: expert_mlp(x, ex))  # fn(x, expert, e): a family's own expert (gpt-oss)
    if T == 1:  # decode: no grouping needed
        order = np.argsort(expert_ids[0], kind="stable")
        uniq = expert_ids[0, order]
        experts.request(layer, uniq)
        for a in order:
            out += expert_weights[0, a] * run(x, experts.get(layer, int(expert_ids[0, a])), int(expert_ids[0, a]))
        return out
    flat = expert_ids.reshape(-1)  # (T*A,)
    order = np.argsort(flat, kind="stable")
    uniq, starts = np.unique(flat[order], return_index=True)
    bounds = np.append(starts, flat.size)
    A = expert_ids.shape[1]
    experts.request(layer, uniq)  # a streaming store queues every missing read before the first compute
    for n, e in enumerate(uniq):
        sel = order[bounds[n]:bounds[n + 1]]  # positions in (T*A) routed to expert e
        tok = sel // A  # (n_e,)
        y = run(np.ascontiguousarray(x[tok]), experts.get(layer, int(e)), int(e))  # (n_e, D)
        out[tok] += expert_weights.reshape(-1)[sel, None] * y
    return out


def expert_mlp(x: np.ndarray, ex) -> np.ndarray:
    """SwiGLU expert: down(silu(gate x) * up x).   x: (n, D) → (n, D)"""
    n_i = ex.gate.rows
    h = np.empty((x.shape[0], n_i), dtype=np.float32)  # (n, I)
    if ex.gate_up is not None:  # one call for both
        ops.swiglu_halves(h, linear(x, ex.gate_up))  # gate_up: (n, 2I)
    else:
        ops.silu_mul(h, linear(x, ex.gate), linear(x, ex.up))
    return linear(h, ex.down)
