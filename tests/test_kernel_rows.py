"""Row consistency of the matrix kernels: row t of `matmul(out, w, x)` is bit-identical to
`matvec(o, w, x[t])`, whatever else is in the batch (T, tiles of 4, chunks of 64), the thread count
and the serial or parallel twin. The server batches several requests' tokens into one call, so
greedy outputs must not depend on their neighbours. Every result is also checked against gguf-py's
dequantised weights, so a kernel that is consistently wrong fails too.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from weight_factory import dequant, make_weight

from edgemoe.kernels import dispatch, matmul, matvec, set_threads
from edgemoe.kernels.layouts import interleave

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
ALL_TYPES = FLOAT_TYPES + (QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
TOKENS = (1, 3, 4, 5, 9, 70)  # single, remainder only, one tile, tile + 1, two tiles + 1, two chunks
# (rows, cols) with odd rows. Floats go 24 columns at a time, then 8s, then scalars: 19 = 2x8 + 3,
# 61 = 2x24 + 8 + 5, 304 = 12x24 + 2x8. 32-blocks go in groups of 8: 96 = 3 blocks (tail only),
# 288 = 8 + 1, 608 = 2x8 + 3. K types: 1, 3 and 5 super-blocks.
SHAPES = {t: ((5, 19), (37, 61), (3, 304)) for t in FLOAT_TYPES}
SHAPES.update({t: ((37, 96), (5, 288), (3, 608)) for t in (QT.Q8_0, QT.Q4_0)})
SHAPES.update({t: ((37, 256), (5, 768), (3, 1280)) for t in (QT.Q4_K, QT.Q5_K, QT.Q6_K)})
# the 8-row interleaved layouts (rows a multiple of 8): a group, 5 groups, 2 groups
X8_SHAPES = {QT.Q4_0: ((40, 96), (8, 288), (16, 608)), QT.Q4_K: ((40, 256), (8, 768), (16, 1280)),
             QT.Q8_0: ((40, 96), (8, 288), (16, 608)),
             **{t: ((40, 96), (8, 288), (16, 608)) for t in (QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL, QT.MXFP4)},
             QT.IQ4_XS: ((40, 256), (8, 768), (16, 1280)), QT.Q3_K: ((40, 256), (8, 768), (16, 1280)),
             QT.Q2_K: ((40, 256), (8, 768), (16, 1280))}
CASES = [(t, 1) for t in ALL_TYPES] + [(t, 8) for t in X8_SHAPES]
# (threads, twin): the serial twin, and the parallel one on one and on two threads
RUNS = ((1, "serial"), (1, "parallel"), (2, "parallel"))


def use(monkeypatch, threads: int, twin: str) -> None:
    set_threads(threads)
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_BYTES", 1 << 62 if twin == "serial" else 0)


@pytest.mark.parametrize("qt,layout", CASES, ids=lambda c: c.name if isinstance(c, QT) else f"x{c}")
def test_matmul_rows_equal_matvec(qt, layout, variant, monkeypatch):
    rng = np.random.default_rng(int(qt) + layout)
    try:
        for rows, cols in SHAPES[qt] if layout == 1 else X8_SHAPES[qt]:
            w = make_weight(qt, rows, cols, rng)
            wd = dequant(w)
            if layout == 8:
                w = interleave(w)
            x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32)  # (T, C)
            single = np.empty((len(x), rows), np.float32)  # (T, R) token by token
            use(monkeypatch, 2, "parallel")
            for t in range(len(x)):
                matvec(single[t], w, x[t])
            # a kernel that is consistently wrong fails here (int8: activations rounded to 1/254 of
            # each block's max, as in test_kernels)
            err = np.abs(single - x.astype(np.float64) @ wd.T) / (np.abs(x.astype(np.float64)) @ np.abs(wd).T)
            assert err.max() < (1e-5 if qt in FLOAT_TYPES else 1e-2), (rows, cols)
            for threads, twin in RUNS:
                use(monkeypatch, threads, twin)
                for n_tok in TOKENS:
                    out = np.full((n_tok, rows), np.nan, np.float32)
                    matmul(out, w, x[:n_tok])
                    bad = np.argwhere(out != single[:n_tok])
                    assert not len(bad), f"{rows}x{cols} T={n_tok} {threads} thread(s) {twin}: rows {bad[:5].tolist()}"
                o = np.empty(rows, np.float32)
                matvec(o, w, x[-1])
                assert np.array_equal(o, single[-1]), f"{rows}x{cols} matvec, {threads} thread(s) {twin}"
    finally:
        set_threads(dispatch.numba.config.NUMBA_NUM_THREADS)
