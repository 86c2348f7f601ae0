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
               experts: ExpertStore, layer: int) -> np.ndarray:
    """Σ_a weight[t, a] · expert[ids[t, a]](x[t]), computing each expert once for all its tokens.

    x: (T, D); expert_ids, expert_weights: (T, A) → (T, D)
    """
    T, _ = x.shape
    out = np.zeros_like(x)  # (T, D)
    flat = expert_ids.reshape(-1)  # (T*A,)
    order = np.argsort(flat, kind="stable")
    uniq, starts = np.unique(flat[order], return_index=True)
    bounds = np.append(starts, flat.size)
    A = expert_ids.shape[1]
    experts.request(layer, uniq)  # a streaming store queues every missing read before the first compute
    for n, e in enumerate(uniq):
        sel = order[bounds[n]:bounds[n + 1]]  # positions in (T*A) routed to expert e
        tok = sel // A  # (n_e,)
        ex = experts.get(layer, int(e))
        xe = np.ascontiguousarray(x[tok])  # (n_e, D)
        h = np.empty((tok.size, ex.gate.rows), dtype=np.float32)  # (n_e, I)
        ops.silu_mul(h, linear(xe, ex.gate), linear(xe, ex.up))
        y = linear(h, ex.down)  # (n_e, D)
        out[tok] += expert_weights.reshape(-1)[sel, None] * y
    return out
