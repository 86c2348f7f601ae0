"""Where each routed expert's bytes are in a GGUF file: one range for a pack, three for an unpacked file."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ..errors import ModelFormatError
from ..formats import names
from ..qtensor import check_supported, row_bytes

PROJS = ("gate", "up", "down")
# Gaps up to this size between an expert's tensors are read through rather than split into separate reads.
MAX_GAP = 64 * 1024


@dataclass(frozen=True)
class Part:
    offset: int  # in the expert's blob (its ranges concatenated)
    qtype: GGMLQuantizationType
    rows: int
    cols: int


@dataclass(frozen=True)
class ExpertExtent:
    layer: int
    expert: int
    ranges: tuple[tuple[int, int], ...]  # (file offset, length) read in this order, concatenated
    parts: dict[str, Part]  # "gate" | "up" | "down" → where it is in the blob

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


def _slice(t, e: int | None) -> tuple[int, int, GGMLQuantizationType, int, int]:
    """(file offset, length, type, rows, cols) of one expert's matrix in tensor `t` (3-D merged or 2-D)."""
    qtype = check_supported(t.tensor_type, f"tensor {t.name}")
    cols, rows = int(t.shape[0]), int(t.shape[1])
    n = rows * row_bytes(qtype, cols)
    off = int(t.data_offset) + (n * e if e is not None else 0)
    return off, n, qtype, rows, cols


def _tensor(tensors: dict, name: str):
    if name not in tensors:
        raise ModelFormatError(f"tensor {name} is missing; the file is incomplete or of another variant")
    return tensors[name]


def gguf_extents(tensors: dict, n_layers: int, n_experts: int, dense_layers=()) -> list[list[ExpertExtent]]:
    """Extents of every expert, from a GGUF tensor index (merged `*_exps` or per-expert tensors); a dense layer
    (in `dense_layers`) has none."""
    out = []
    for i in range(n_layers):
        layer = []
        if i in dense_layers:
            out.append(layer)
            continue
        merged = names.GGUF_EXPERTS["gate"].format(i=i) in tensors
        for e in range(n_experts):
            if merged:
                sl = {p: _slice(_tensor(tensors, names.GGUF_EXPERTS[p].format(i=i)), e) for p in PROJS}
            else:
                sl = {p: _slice(_tensor(tensors, names.GGUF_EXPERT_SPLIT[p].format(i=i, e=e)), None) for p in PROJS}
            layer.append(_extent(i, e, sl))
        out.append(layer)
    return out


def _extent(i: int, e: int, sl: dict) -> ExpertExtent:
    order = sorted(PROJS, key=lambda p: sl[p][0])
    start = sl[order[0]][0]
    end = max(off + n for off, n, *_ in sl.values())
    contiguous = all(sl[b][0] - (sl[a][0] + sl[a][1]) in range(0, MAX_GAP + 1) for a, b in zip(order, order[1:]))
    if contiguous:  # a pack: one read covers gate, up and down and the alignment padding between them
        parts = {p: Part(sl[p][0] - start, *sl[p][2:]) for p in PROJS}
        return ExpertExtent(i, e, ((start, end - start),), parts)
    ranges, parts, pos = [], {}, 0
    for p in PROJS:
        off, n, qtype, rows, cols = sl[p]
        ranges.append((off, n))
        parts[p] = Part(pos, qtype, rows, cols)
        pos += n
    return ExpertExtent(i, e, tuple(ranges), parts)
