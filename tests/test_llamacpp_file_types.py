"""Every file type llama-quantize makes, read by edgemoe and run against llama.cpp on the same file.

One random Mixtral-shape model (transformers), exported as F32 GGUF, is quantised by llama.cpp's own
quantiser (tests/llamacpp_quantize.py) to each file type of FILE_TYPES: the real tensor mixes of
downloaded files (Q3_K_M puts Q3_K, Q4_K, Q5_K and Q6_K side by side; the IQ mixes add Q2_K/Q4_K
fallbacks), with an importance matrix for the very-low-bit types. For each file:
- every tensor dequantised by edgemoe is bit-identical to gguf.quants on the same bytes;
- edgemoe and llama.cpp, given the same token ids, agree: the top token is the same wherever
  llama.cpp's choice is clear, and the top-5 tokens overlap in at least 4 of 5 at every position.
Runs where llama-cpp-python is installed (`pip install '.[bench]'`).
"""

from __future__ import annotations

import gguf.quants as gq
import llamacpp_oracle
import numpy as np
import pytest
from gguf import GGUFReader
from llamacpp_oracle import engine_run
from llamacpp_quantize import FILE_TYPES, quantize
from mixtral_factory import make_hf_mixtral

from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.qtensor import FORMATS, row_bytes
from edgemoe.quants import dequantize

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[bench]')")

IDS = [1, 45, 99, 7, 120, 3, 64, 18, 200, 11, 77, 150]
# File types run on the fused blocks as `run` does; the others kernel by kernel: each file's mix of types is its
# own set of fused kernels to compile (~10 s each), and the fused blocks give the kernels' bits for every type
# (tests/test_fused.py, the types' own tests)
FUSED = ("Q4_K_M", "Q3_K_M")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An F32 GGUF of a random Mixtral whose widths fill whole K super-blocks (256, 512).

    The routers' weights are scaled up 4x so that the top-2 choice has clear margins: at random
    weights' flat router logits, 8-bit activation noise alone swaps experts in either engine, and one
    swapped expert moves the logits by tens of percent.
    """
    _, cfg, tensors = make_hf_mixtral(hidden=256, intermediate=512, heads=4, kv_heads=2, experts=4, top_k=2,
                                      vocab=256, seed=11)
    for name in tensors:
        if name.endswith("block_sparse_moe.gate.weight"):
            tensors[name] = tensors[name] * np.float32(4)
    path = tmp_path_factory.mktemp("filetypes") / "f32.gguf"
    export_mixtral_gguf(path, cfg, tensors)
    return path


@pytest.fixture(scope="module")
def quantized(source):
    made = {}

    def get(file_type: str):
        if file_type not in made:
            made[file_type] = source.with_name(f"{file_type}.gguf")
            quantize(source, made[file_type], file_type)
        return made[file_type]

    return get


@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_dequantize_matches_gguf(file_type, quantized):
    reader = GGUFReader(quantized(file_type))
    seen = set()
    for t in reader.tensors:
        qt = t.tensor_type
        assert qt in FORMATS, f"{t.name}: {qt.name} is not supported"
        raw = np.ascontiguousarray(t.data)
        cols = int(t.shape[0])  # ggml order: the row length first
        ours = dequantize(raw.view(np.uint8).reshape(-1, row_bytes(qt, cols)), qt, cols)  # (rows, cols)
        with np.errstate(all="ignore"):
            ref = gq.dequantize(raw, qt).reshape(ours.shape)
        assert np.array_equal(ours.view(np.uint32), np.ascontiguousarray(ref, np.float32).view(np.uint32)), t.name
        seen.add(qt.name)
    print(f"{file_type}: {sorted(seen)}")


@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_engine_agrees_with_llama_cpp(file_type, quantized):
    path = quantized(file_type)
    want, _ = llamacpp_oracle.run(llamacpp_oracle.load(path), IDS, 1)
    got, _ = engine_run(path, IDS, 1, fused=file_type in FUSED)
    scale = np.abs(want).max()
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * scale
    assert clear.sum() >= 2, "the check needs positions with a clear top token"
    agree = got.argmax(-1) == want.argmax(-1)
    assert agree[clear].all(), f"top token differs at clear positions {np.flatnonzero(clear & ~agree)}"
    # our top 5 against llama.cpp's: a token counts if llama.cpp scores it within 1 % of the logits'
    # scale of its own 5th best (near-ties at rank 5 are noise, not disagreement)
    top5 = np.argsort(-got, axis=-1)[:, :5]  # (T, 5)
    fifth = np.sort(want, axis=-1)[:, -5]  # (T,)
    overlap = [int((w[t] >= f - 0.01 * scale).sum()) for w, t, f in zip(want, top5, fifth)]
    assert min(overlap) >= 4, f"top-5 overlap per position {overlap}"
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"{file_type}: relative L2 {rel:.3g}, top-1 equal at {agree.sum()}/{len(agree)} positions, top-5 overlap {overlap}")
