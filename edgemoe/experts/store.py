"""Expert stores: the model asks for (layer, expert) and gets three matrices, wherever they live."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from ..qtensor import QTensor


class Expert(NamedTuple):
    """One routed expert: SwiGLU down(silu(gate x) * up x).  gate, up: (I, D); down: (D, I)."""

    gate: QTensor
    up: QTensor
    down: QTensor

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class ExpertStore(Protocol):
    n_layers: int
    n_experts: int

    def get(self, layer: int, expert: int) -> Expert: ...


class ResidentExperts:
    """Every expert already addressable in memory (zero-copy views of a memory-mapped file)."""

    def __init__(self, experts: list[list[Expert]]):
        self._experts = experts  # [layer][expert]
        self.n_layers = len(experts)
        self.n_experts = len(experts[0]) if experts else 0

    def get(self, layer: int, expert: int) -> Expert:
        return self._experts[layer][expert]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for layer in self._experts for e in layer)
