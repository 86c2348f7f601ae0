"""Expert stores: the model asks for (layer, expert) and gets three matrices, wherever they live."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from ..kernels.layouts import interleave, interleave_if_eligible, x8_eligible, x8_rows
from ..qtensor import QTensor


class Expert(NamedTuple):
    """One routed expert: SwiGLU down(silu(gate x) * up x).  gate, up: (I, D); down: (D, I)."""

    gate: QTensor
    up: QTensor
    down: QTensor
    gate_up: QTensor | None = None  # gate's rows then up's in one matrix (gate, up are views of it), if stored so

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


def with_gate_up(gate_up: QTensor, down: QTensor) -> Expert:
    """An expert whose gate and up are the two halves of one 8-row interleaved (2I, D) matrix."""
    n = gate_up.rows // 2
    return Expert(x8_rows(gate_up, 0, n), x8_rows(gate_up, n, n), down, gate_up)


def _x8_expert(e: Expert) -> Expert:
    g, u = e.gate, e.up
    down = interleave_if_eligible(e.down)
    if g.interleave == u.interleave == 1 and g.shape == u.shape and g.qtype == u.qtype and x8_eligible(g.qtype, g.rows):
        return with_gate_up(interleave(QTensor(np.concatenate([g.data, u.data]), g.qtype, 2 * g.rows, g.cols)), down)
    return Expert(interleave_if_eligible(g), interleave_if_eligible(u), down)


class ExpertStore(Protocol):
    n_layers: int
    n_experts: int

    wants_hints: bool  # True when `hint` does something (predictions cost a router pass)
    hint_depth: int  # how many layers ahead predictions are wanted (0 with wants_hints False)

    def get(self, layer: int, expert: int) -> Expert:
        """Layer `layer`'s expert; the experts got for one step stay valid together."""

    def request(self, layer: int, experts) -> None:
        """All of `experts` of `layer` are needed in this step (get() follows for each)."""

    def hint(self, layer: int, experts, depth: int = 1) -> None:
        """A prediction, made `depth` layers before it, that `experts` of `layer` will be needed soon."""

    def close(self) -> None:
        """Stop background work and free buffers."""

    def repack_x8(self) -> None:
        """Keep matrices of the types in layouts.X8 in the 8-row interleaved layouts, now and as they arrive."""

    def resident(self, layer: int) -> np.ndarray:
        """(E,) bool: which experts of `layer` are in RAM now (no counters change)."""

    def in_ram(self) -> ExpertStore:
        """A view of this store for self-drafting: `get` of a resident expert, with no read, no hint and no
        cache counters or policy change; `request` does nothing."""


class ResidentExperts:
    """Every expert already addressable in memory (zero-copy views of a memory-mapped file)."""

    def __init__(self, experts: list[list[Expert]]):
        self._experts = experts  # [layer][expert]
        self.n_layers = len(experts)
        self.n_experts = max((len(x) for x in experts), default=0)  # a dense layer has none

    wants_hints = False
    hint_depth = 0

    def repack_x8(self) -> None:
        """Copy every matrix of a type in layouts.X8 (rows divisible by 8) into the 8-row interleaved layout, gate and up of
        an expert stacked into one matrix."""
        self._experts = [[_x8_expert(e) for e in layer] for layer in self._experts]

    def get(self, layer: int, expert: int) -> Expert:
        return self._experts[layer][expert]

    def request(self, layer: int, experts) -> None:
        pass

    def hint(self, layer: int, experts, depth: int = 1) -> None:
        pass

    def resident(self, layer: int) -> np.ndarray:
        return np.ones(self.n_experts, dtype=bool)

    def in_ram(self) -> ResidentExperts:
        return self

    def close(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for layer in self._experts for e in layer)
