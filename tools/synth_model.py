"""Synthesise a random-weight Mixtral-architecture GGUF (arch llama with experts) of a real model's shape, fast.

    python tools/synth_model.py mixtral-8x7b -o /data/mixtral-synth.gguf            # ~25 GB, Q4_0 experts
    python tools/synth_model.py qwen3-30b-a3b --scale 0.25 --layers 8 --packed -o q.pack.gguf
    python tools/synth_model.py tiny -o tiny.gguf

Quantised weights are random blocks written straight to the file, never float weights run through a
quantiser: random bytes for the quants, and each block's f16 scale set so that a row's dequantised values
have standard deviation ≈ 1/sqrt(cols) (activations stay O(1)) with a random sign (zero mean).
Shapes other than Mixtral's are approximated with the Mixtral architecture (no QK-norm, no shared
experts). The vocabulary is the default model's small word-level SentencePiece-style one, so
vocab_size is its token count. `--packed` writes the expert-pack layout and manifest directly.
Random routing has no locality: such a model bounds the worst case for expert caching, nothing more.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe.default_model import vocabulary, write_vocab  # noqa: E402
from edgemoe.formats.gguf_export import _add_metadata, _Hparams, _read_tokenizer  # noqa: E402
from edgemoe.formats.names import GGUF_EXPERT_SPLIT, GGUF_EXPERTS  # noqa: E402
from edgemoe.pack.layout import ExpertJobs, PackPlan, write_pack  # noqa: E402
from edgemoe.pack.stream import CHUNK_BYTES, TensorJob, write_gguf  # noqa: E402
from edgemoe.qtensor import row_bytes  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int  # D
    intermediate: int  # I, per expert
    heads: int  # H
    kv_heads: int  # KV
    head_dim: int
    experts: int  # E
    top_k: int
    context: int
    rope_theta: float


PRESETS = {
    "tiny": Shape(2, 256, 512, 8, 2, 32, 8, 2, 2048, 1e6),
    "mixtral-8x7b": Shape(32, 4096, 14336, 32, 8, 128, 8, 2, 32768, 1e6),
    "qwen3-30b-a3b": Shape(48, 2048, 768, 32, 4, 128, 128, 8, 40960, 1e6),
    "olmoe-1b-7b": Shape(16, 2048, 1024, 16, 16, 128, 64, 8, 4096, 1e4),
}
EXPERT_TYPES = ("Q4_0", "Q4_K")
DENSE_TYPES = ("Q8_0", "F16")
_WIDTH_STEP = 256  # hidden and intermediate sizes stay multiples of the Q4_K super-block

# Per block type: byte offset of the f16 scale d, and E[level²] of the random levels it multiplies,
# so that |d| = 1 / sqrt(cols · E[level²]) gives values of variance 1/cols.
#   Q4_0: level = q - 8, q uniform in 0..15            → E = 344/16 = 21.5
#   Q8_0: level = q, q uniform int8                     → E = 5461.5
#   Q4_K: level = 8·(q - 7.5) (sub-block scales and mins fixed at 8, dmin = 7.5·d) → E = 64 · 21.25
_LEVEL_SQ = {Q.Q4_0: 21.5, Q.Q8_0: 5461.5, Q.Q4_K: 64 * 21.25}
# Q4_K scales[12] with all eight 6-bit scales and mins = 8 (get_scale_min_k4's packing).
_Q4_K_SCALES = np.array([8, 8, 8, 8, 8, 8, 8, 8, 0x88, 0x88, 0x88, 0x88], dtype=np.uint8)


def scaled(shape: Shape, scale: float = 1.0, layers: int | None = None) -> Shape:
    """Width × `scale` (hidden, intermediate and head counts; head_dim kept), optionally another depth."""
    if not 0 < scale <= 4:
        raise ValueError(f"--scale must be in (0, 4], got {scale}")

    def width(n: int) -> int:
        return max(_WIDTH_STEP, round(n * scale / _WIDTH_STEP) * _WIDTH_STEP)

    heads = max(1, round(shape.heads * scale))
    kv = max(1, min(heads, round(shape.kv_heads * scale)))
    while heads % kv:
        kv -= 1
    n_layers = shape.layers if layers is None else layers
    if n_layers < 1:
        raise ValueError(f"--layers must be at least 1, got {n_layers}")
    return replace(shape, layers=n_layers, hidden=width(shape.hidden), intermediate=width(shape.intermediate),
                   heads=heads, kv_heads=kv)


# --------------------------------------------------------------------------------------- random data

def random_rows(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """(rows, row_bytes) uint8 of valid `qtype` data whose dequantised rows have std ≈ 1/sqrt(cols)."""
    if qtype in (Q.F32, Q.F16):
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(1 / math.sqrt(cols))
        return x.astype(np.float16 if qtype == Q.F16 else np.float32).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    words = rng.bit_generator.random_raw(-(-n_blocks * size // 8))  # uint64; releases the GIL, unlike integers()
    blocks = words.view(np.uint8)[: n_blocks * size].reshape(n_blocks, size)  # (B, size) random bytes
    d = int(np.float16(1 / math.sqrt(cols * _LEVEL_SQ[qtype])).view(np.uint16))
    # Keep each block's random sign bit of d (zero-mean weights), overwrite the rest of the scale field(s);
    # whole-word writes, as one strided pass per word costs more than generating the bytes.
    if qtype == Q.Q4_K:  # bytes 0-15 = d | dmin | scales[12], as two little-endian uint64 words
        dmin = int(np.float16(7.5 * float(np.uint16(d).view(np.float16))).view(np.uint16))  # centres q on 7.5
        head = blocks.view(np.uint64)  # (B, 18)
        signs = head[:, 0] & np.uint64(0x8000)
        lo = d | dmin << 16 | int.from_bytes(_Q4_K_SCALES[:4].tobytes(), "little") << 32
        head[:, 0] = np.uint64(lo) | signs | signs << np.uint64(16)  # the same sign on d and dmin
        head[:, 1] = np.uint64(int.from_bytes(_Q4_K_SCALES[4:].tobytes(), "little"))
    else:  # Q4_0, Q8_0: d is the first uint16
        head = blocks.view(np.uint16)  # (B, size / 2)
        head[:, 0] = (head[:, 0] & np.uint16(0x8000)) | np.uint16(d)
    return blocks.reshape(rows, -1)


def random_job(name: str, qtype: Q, shape: tuple[int, ...], seed: tuple[int, ...],
               pool: ThreadPoolExecutor | None = None) -> TensorJob:
    """A tensor of random rows, generated a chunk at a time (the same bytes on every run with `seed`).

    With `pool` (one worker), the next chunk is generated while the caller writes the current one."""
    cols = shape[-1]
    rows = int(np.prod(shape[:-1]))
    step = max(1, CHUNK_BYTES // row_bytes(qtype, cols))

    def chunks() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(list(seed))
        for r in range(0, rows, step):
            yield random_rows(rng, qtype, min(step, rows - r), cols)

    def chunks_ahead() -> Iterator[np.ndarray]:
        it = chunks()
        pending = pool.submit(next, it, None)
        while (chunk := pending.result()) is not None:
            pending = pool.submit(next, it, None)
            yield chunk

    return TensorJob(name, qtype, shape, chunks if pool is None else chunks_ahead)


def const_job(name: str, value: float, n: int) -> TensorJob:
    v = np.full(n, value, dtype=np.float32)  # (n,)
    return TensorJob(name, Q.F32, (n,), lambda: (v,))


# ------------------------------------------------------------------------------------------ the model

def model_jobs(s: Shape, expert_type: Q, dense_type: Q, seed: int, packed: bool,
               pool: ThreadPoolExecutor | None = None):
    """(dense jobs in file order, experts) for a pack, or (all jobs in gguf_export's order, []) otherwise."""
    D, I, E, V = s.hidden, s.intermediate, s.experts, len(vocabulary()[0])
    q_rows, kv_rows = s.heads * s.head_dim, s.kv_heads * s.head_dim
    tag = iter(range(1 << 30))

    def rand(name: str, qtype: Q, *shape: int) -> TensorJob:
        return random_job(name, qtype, shape, (seed, next(tag)), pool)

    dense: list[TensorJob] = [rand("token_embd.weight", dense_type, V, D)]
    experts: list[ExpertJobs] = []
    for i in range(s.layers):
        dense += [const_job(f"blk.{i}.attn_norm.weight", 1.0, D),
                  rand(f"blk.{i}.attn_q.weight", dense_type, q_rows, D),
                  rand(f"blk.{i}.attn_k.weight", dense_type, kv_rows, D),
                  rand(f"blk.{i}.attn_v.weight", dense_type, kv_rows, D),
                  rand(f"blk.{i}.attn_output.weight", dense_type, D, q_rows),
                  const_job(f"blk.{i}.ffn_norm.weight", 1.0, D),
                  rand(f"blk.{i}.ffn_gate_inp.weight", Q.F32, E, D)]
        out_in = {"gate": (I, D), "up": (I, D), "down": (D, I)}
        if packed:
            for e in range(E):
                j = {p: rand(GGUF_EXPERT_SPLIT[p].format(i=i, e=e), expert_type, *out_in[p]) for p in out_in}
                experts.append(ExpertJobs(i, e, j["gate"], j["up"], j["down"]))
        else:  # merged (E, out, in) tensors in the converter's order
            dense += [rand(GGUF_EXPERTS[p].format(i=i), expert_type, E, *out_in[p]) for p in ("gate", "down", "up")]
    dense += [const_job("output_norm.weight", 1.0, D), rand("output.weight", dense_type, V, D)]
    return dense, experts


def new_writer(s: Shape, name: str, expert_type: Q) -> GGUFWriter:
    """A GGUFWriter holding the llama metadata gguf_export writes, and the default model's vocabulary."""
    n_vocab = len(vocabulary()[0])
    cfg = {"architectures": ["MixtralForCausalLM"], "_name_or_path": name, "num_hidden_layers": s.layers,
           "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_attention_heads": s.heads,
           "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "num_local_experts": s.experts,
           "num_experts_per_tok": s.top_k, "vocab_size": n_vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": s.context, "rope_theta": s.rope_theta, "tie_word_embeddings": False}
    w = GGUFWriter(None, "llama")
    _add_metadata(w, _Hparams.from_config(cfg), cfg, expert_type)
    with tempfile.TemporaryDirectory() as d:
        vocab_path = os.path.join(d, "vocab.gguf")
        write_vocab(vocab_path)
        for key, (value, vtype, sub) in _read_tokenizer(vocab_path, n_vocab).items():
            w.add_key_value(key, value, vtype, sub)
    return w


def synthesize(path: str, shape: Shape, *, name: str, expert_quant: str = "Q4_0", dense_quant: str = "Q8_0",
               packed: bool = False, seed: int = 0, progress: bool | None = None) -> int:
    """Write the model at `path` (via `path.tmp`; with --packed also its manifest); return its size in bytes."""
    if expert_quant not in EXPERT_TYPES or dense_quant not in DENSE_TYPES:
        raise ValueError(f"expert quant must be one of {EXPERT_TYPES}, dense one of {DENSE_TYPES}")
    expert_type, dense_type = Q[expert_quant], Q[dense_quant]
    if expert_type == Q.Q4_K and (shape.hidden % 256 or shape.intermediate % 256):
        raise ValueError("Q4_K experts need hidden and intermediate sizes that are multiples of 256")
    writer = new_writer(shape, name, expert_type)
    with ThreadPoolExecutor(1) as pool:  # generates while the main thread writes (and checksums)
        return _write(path, writer, *model_jobs(shape, expert_type, dense_type, seed, packed, pool), shape=shape,
                      name=name, packed=packed, progress=progress)


def _write(path: str, writer: GGUFWriter, dense: list[TensorJob], experts: list[ExpertJobs], *, shape: Shape,
           name: str, packed: bool, progress: bool | None) -> int:
    if packed:
        plan = PackPlan(writer, dense, experts, f"synthetic:{name}", "synthetic",
                        {"name": name, "architecture": "llama", "num_hidden_layers": shape.layers,
                         "num_local_experts": shape.experts, "num_experts_per_tok": shape.top_k,
                         "hidden_size": shape.hidden, "intermediate_size": shape.intermediate})
        return write_pack(path, plan, progress=progress)["pack_bytes"]
    tmp = path + ".tmp"
    try:
        layout = write_gguf(writer, tmp, dense, progress=progress, desc=f"writing {os.path.basename(path)}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return layout.file_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS), help="model shape")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.add_argument("--scale", type=float, default=1.0, help="width factor (hidden, intermediate, heads), e.g. 0.25")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--expert-quant", choices=EXPERT_TYPES, default="Q4_0", help="routed experts' type")
    p.add_argument("--dense-quant", choices=DENSE_TYPES, default="Q8_0", help="attention/embedding/output type")
    p.add_argument("--packed", action="store_true", help="write the expert-pack layout and its manifest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        shape = scaled(PRESETS[args.preset], args.scale, args.layers)
    except ValueError as e:
        p.error(str(e))
    name = args.preset + (f"@{args.scale:g}x" if args.scale != 1 else "") + (f"-{shape.layers}L" if args.layers else "")
    print(f"{name}: {shape}", file=sys.stderr)
    t0 = time.perf_counter()
    size = synthesize(args.output, shape, name=name, expert_quant=args.expert_quant, dense_quant=args.dense_quant,
                      packed=args.packed, seed=args.seed, progress=False if args.quiet else None)
    dt = time.perf_counter() - t0
    print(f"wrote {args.output}: {size / 1e9:.2f} GB in {dt:.1f} s ({size / 1e9 / dt:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
