"""The 8-row interleaved ("x8") storage layouts: which weight types have one, and moving a matrix into it.

A plain matrix (R, row bytes) of a type in `X8` with R divisible by 8 can be repacked, at load or as a
streamed expert arrives, into (R / 8, 8 * row bytes): the same bytes, 8 rows' blocks side by side, which
its x8 kernel (`kinds.KINDS[(type, 8)]`) reads with one activation load for 8 rows and no horizontal
sums. Each type's layout is described in its module (`q4x8`, `q4kx8`,
`q8x8`, `q451x8`, `lut4x8`, `iq4xsx8`, `q2kx8`, `q3kx8`).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import UnsupportedError
from ..qtensor import QTensor
from .iq4xsx8 import repack_iq4_xs_x8, unpack_iq4_xs_x8
from .kinds import INTERLEAVED
from .lut4x8 import repack_lut4_x8, unpack_lut4_x8
from .q2kx8 import repack_q2_k_x8, unpack_q2_k_x8
from .q3kx8 import repack_q3_k_x8, unpack_q3_k_x8
from .q4kx8 import repack_q4_k_x8, unpack_q4_k_x8
from .q4x8 import repack_q4_0_x8, unpack_q4_0_x8
from .q8x8 import repack_q8_0_x8, unpack_q8_0_x8
from .q451x8 import repack_q451_x8, unpack_q451_x8

# {type: (repack(plain (R, n) uint8, out=None) -> (R / 8, 8n), unpack(x8) -> plain)}
X8 = {
    QT.Q4_0: (repack_q4_0_x8, unpack_q4_0_x8),
    QT.Q4_K: (repack_q4_k_x8, unpack_q4_k_x8),
    QT.Q8_0: (repack_q8_0_x8, unpack_q8_0_x8),
    **{t: (partial(repack_q451_x8, t), partial(unpack_q451_x8, t)) for t in (QT.Q4_1, QT.Q5_0, QT.Q5_1)},
    **{t: (partial(repack_lut4_x8, t), partial(unpack_lut4_x8, t)) for t in (QT.IQ4_NL, QT.MXFP4)},
    QT.IQ4_XS: (repack_iq4_xs_x8, unpack_iq4_xs_x8),
    QT.Q2_K: (repack_q2_k_x8, unpack_q2_k_x8),
    QT.Q3_K: (repack_q3_k_x8, unpack_q3_k_x8),
}
assert set(X8) == INTERLEAVED, "every x8 layout needs its kernels in kinds.KINDS, and the other way round"
X8_NAMES = "/".join(t.name for t in X8)


def x8_eligible(qtype, rows: int) -> bool:
    """Whether a plain matrix of this type and row count can take the x8 layout."""
    return qtype in X8 and rows % 8 == 0


def repack_x8(qtype, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain rows of `qtype` -> its x8 layout (the same number of bytes), into `out` if given."""
    return X8[qtype][0](data, out)


def unpack_x8(qtype, data: np.ndarray) -> np.ndarray:
    """x8 layout of `qtype` -> plain rows (a new array)."""
    return X8[qtype][1](data)


def interleave(w: QTensor) -> QTensor:
    """A plain QTensor of a type in X8 (rows divisible by 8) in the x8 layout (`interleave` 8)."""
    if not x8_eligible(w.qtype, w.rows) or w.interleave != 1:
        raise UnsupportedError(f"only plain {X8_NAMES} weights with rows divisible by 8 can be interleaved "
                               f"(got {w.qtype.name}, {w.rows} rows, interleave {w.interleave})")
    return QTensor(repack_x8(w.qtype, w.data), w.qtype, w.rows, w.cols, interleave=8)


def interleave_if_eligible(w: QTensor) -> QTensor:
    """`w` in the x8 layout when it is plain, of a type in X8, with rows divisible by 8; else `w` itself."""
    return interleave(w) if w.interleave == 1 and x8_eligible(w.qtype, w.rows) else w


def x8_rows(w: QTensor, r0: int, n: int) -> QTensor:
    """Rows r0 .. r0 + n of an x8 matrix, as a view (r0 and n multiples of 8)."""
    return QTensor(w.data[r0 // 8:(r0 + n) // 8], w.qtype, n, w.cols, 8)
