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

    wants_hints: bool  # True when `hint` does something (predictions cost a router pass)

    def get(self, layer: int, expert: int) -> Expert: ...

    def request(self, layer: int, experts) -> None:
        """All of `experts` of `layer` are needed in this step (get() follows for each)."""

    def hint(self, layer: int, experts) -> None:
        """A prediction that `experts` of `layer` will be needed soon."""

    def close(self) -> None:
        """Stop background work and free buffers."""


class ResidentExperts:
    """Every expert already addressable in memory (zero-copy views of a memory-mapped file)."""

    def __init__(self, experts: list[list[Expert]]):
        self._experts = experts  # [layer][expert]
        self.n_layers = len(experts)
        self.n_experts = len(experts[0]) if experts else 0

    wants_hints = False

    def get(self, layer: int, expert: int) -> Expert:
        return self._experts[layer][expert]

    def request(self, layer: int, experts) -> None:
        pass

    def hint(self, layer: int, experts) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for layer in self._experts for e in layer)
