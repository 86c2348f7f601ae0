"""Synthesise a random-weight MoE GGUF of a real model's shape and family, fast.

    python tools/synth_model.py qwen3-30b-a3b --scale 0.5 --layers 8 -o q3.gguf     # qwen3moe, Q4_K_M-like
    python tools/synth_model.py qwen1.5-moe-a2.7b --layers 2 --packed -o q2.pack.gguf
    python tools/synth_model.py olmoe-1b-7b --layers 4 -o olmoe.gguf
    python tools/synth_model.py gpt-oss-20b -o goss.gguf                              # gpt-oss, MXFP4, 10.9 GB
    python tools/synth_model.py deepseek-v2-lite --scale 0.25 -o dsl.gguf            # deepseek2, latent attention
    python tools/synth_model.py mixtral-8x7b -o /data/mixtral-synth.gguf            # ~25 GB, Q4_0 experts
    python tools/synth_model.py tiny -o tiny.gguf
    python tools/synth_model.py olmoe-1b-7b --layers 4 --as-mixtral -o old.gguf    # the shape as arch llama

Presets and what each writes (tensor names, shapes and metadata keys are those of llama.cpp's
`convert_hf_to_gguf.py` for the family; ggml shapes, columns first):

- `mixtral-8x7b`, `tiny`: arch `llama` with experts (Mixtral), as `edgemoe.formats.gguf_export` writes it:
  Q/K rows as the converter's permutation leaves them (random rows: a permutation of random rows is random),
  `llama.*` keys incl. `feed_forward_length` (= expert width), `attention.key_length`/`value_length`,
  `vocab_size`, `rope.dimension_count`; experts merged `ffn_{gate,down,up}_exps`.
- `qwen3-30b-a3b` (Qwen3-30B-A3B: 48 layers, hidden 2048, 32 heads / 4 kv, head_dim 128, 128 experts
  top-8, expert width 768, dense width 6144, rope 1e6, rms eps 1e-6): arch `qwen3moe`, per layer
  `attn_norm`, `attn_q/k/v/output`, `attn_q_norm` and `attn_k_norm` of [head_dim] (F32), `ffn_norm`,
  `ffn_gate_inp` [hidden, E] (F32), `ffn_{down,gate,up}_exps`. Keys `qwen3moe.{block_count, context_length,
  embedding_length, feed_forward_length (6144: the config's dense width, unused), head_count,
  head_count_kv, rope.freq_base, attention.layer_norm_rms_epsilon, expert_count, expert_used_count,
  attention.key_length, attention.value_length, expert_feed_forward_length}`.
- `qwen1.5-moe-a2.7b` (Qwen1.5-MoE-A2.7B: 24 layers, hidden 2048, 16 heads / 16 kv, 60 experts top-4, expert
  width 1408, shared expert 5632, rope 1e6, rms eps 1e-6): arch `qwen2moe`, per layer `attn_{q,k,v}.bias`
  (F32), no q/k norms, the routed experts plus `ffn_{gate,up,down}_shexp` and the shared expert's gate
  `ffn_gate_inp_shexp` as the converter writes it: F32, ggml shape [hidden, 1]. Keys as qwen3moe without
  `key_length`/`value_length` (the config has no head_dim: head_dim = hidden / heads) plus
  `expert_shared_feed_forward_length`.
- `olmoe-1b-7b` (OLMoE-1B-7B-0924: 16 layers, hidden 2048, 16 heads / 16 kv, 64 experts top-8, expert width
  1024, rope 1e4): arch `olmoe`, `attn_q_norm` of [hidden] and `attn_k_norm` of [kv_heads · head_dim]
  (F32), no biases; `feed_forward_length` is the expert width, no `expert_feed_forward_length`,
  `layer_norm_rms_epsilon` 1e-5 (the converter overwrites it), no key_length.
- `gpt-oss-20b` (gpt-oss-20b: 24 layers, hidden 2880, 64 heads / 8 kv, head_dim 64, 32 experts top-4 of width
  2880, sliding window 128 on every other layer, YaRN factor 32 over 4096 positions, rope 150000): arch
  `gpt-oss`, per layer `attn_{q,k,v,output}.bias` (F32), `attn_sinks` [heads] (F32, N(0, 0.5²)),
  `post_attention_norm` (where the others have `ffn_norm`), `ffn_gate_inp.bias` [E], the merged experts and
  their biases `ffn_{gate,up}_exps.bias` [I, E] and `ffn_down_exps.bias` [hidden, E]. Keys
  `gpt-oss.{block_count, context_length, embedding_length, feed_forward_length, head_count, head_count_kv,
  rope.freq_base, rope.scaling.{type, factor, original_context_length, yarn_beta_fast, yarn_beta_slow},
  attention.layer_norm_rms_epsilon, expert_count, expert_used_count, attention.key_length,
  attention.value_length, attention.sliding_window, expert_feed_forward_length}`; experts MXFP4 as released
  (`--mix mxfp4`, its default).
- `deepseek-v2-lite` (DeepSeek-V2-Lite: 27 layers, hidden 2048, 16 heads, multi-head latent attention with
  kv_lora_rank 512, no q compression, nope / rope / v head dims 128 / 64 / 128, 64 experts top-6 of width 1408,
  2 shared experts, the first layer dense of width 10944, YaRN factor 40 over 4096 positions with mscale
  0.707, rope 1e4): arch `deepseek2`, per layer `attn_q` [hidden, H·192], `attn_kv_a_mqa` [hidden, 576],
  `attn_kv_a_norm` [512], `attn_k_b` [128, 512, H], `attn_v_b` [512, 128, H] (the converter's split of
  kv_b_proj), `attn_output`; layer 0 `ffn_{gate,up,down}`, the others the routed experts and
  `ffn_{gate,up,down}_shexp` (width 2 × 1408, no gate). Keys `deepseek2.{block_count, context_length,
  embedding_length, feed_forward_length (10944), head_count, head_count_kv (1), rope.scaling.{type, factor,
  original_context_length, yarn_beta_fast, yarn_beta_slow, yarn_log_multiplier}, rope.freq_base,
  attention.layer_norm_rms_epsilon, expert_count, expert_used_count, attention.key_length (576),
  attention.value_length (512), leading_dense_block_count, vocab_size, attention.kv_lora_rank,
  attention.key_length_mla (192), attention.value_length_mla (128), expert_feed_forward_length,
  expert_shared_count, expert_weights_scale, rope.dimension_count (64)}`. `--scale` keeps the latent and head
  dimensions.
All: `general.{architecture, type, name, file_type, quantization_version}`, output.weight untied (llama.cpp's
qwen2moe and olmoe loaders require it), no `{arch}.vocab_size` / `rope.dimension_count` for the three
families (the converter writes neither; both engines take the token count and head_dim).

Types. Norm vectors, q/k norms, biases, the router and the shared-expert gate are F32, as the converter
writes them. `--mix q4_k_m` (the default for the three family presets): routed and shared experts Q4_K,
dense matrices (embedding, attention, output) Q8_0. llama.cpp's own Q4_K_M recipe differs in three ways:
its dense matrices are Q4_K; ffn_down, attn_v and output.weight get Q6_K in about half the layers; and a
Q4_K matrix whose rows are not a multiple of 256 falls back to Q5_0 — Qwen1.5-MoE's and DeepSeek-V2-Lite's
ffn_down_exps, rows of 1408 —, as here. Any other type whose blocks do not fit a row falls back to F16, as the
converter does. `mixtral-8x7b` and `tiny` default to Q4_0 experts and Q8_0 dense matrices (as before);
`--expert-quant`/`--dense-quant` choose explicitly (F32 everywhere gives a file two engines agree on to
float rounding).

Quantised weights are random blocks written straight to the file, never float weights run through a
quantiser: random bytes for the quants, and each block's f16 scale set so that a row's dequantised values
have standard deviation ≈ 1/sqrt(cols) (activations stay O(1)) with a random sign (zero mean). Norm weights
are 1, biases N(0, 0.1²). Every tensor (and every expert of a merged tensor) has its own seed derived from
its name, so `--packed` writes exactly the bytes of the unpacked file in the expert-pack layout (plus its
manifest), and the same --seed gives the same file. The vocabulary is the default model's small
SentencePiece-style one for every family (the converter would write the checkpoint's own BPE vocabulary),
so vocab_size is its token count.

`--scale` multiplies hidden size, expert and shared-expert widths and head counts (head_dim kept): widths
that are multiples of 256 stay multiples of 256 (Q4_K super-blocks), others (1408) multiples of 32; for
OLMoE and Qwen1.5-MoE, whose attention spans the hidden size, heads = hidden / head_dim. `--experts`
changes the expert count (top-k capped by it). Random routing has no locality: such a model bounds the
worst case for expert caching, nothing more.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, RopeScalingType
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe.default_model import vocabulary, write_vocab  # noqa: E402
from edgemoe.formats.gguf_export import _add_metadata, _Hparams, _read_tokenizer  # noqa: E402
from edgemoe.formats.names import GGUF_EXPERT_SPLIT, GGUF_EXPERTS  # noqa: E402
from edgemoe.pack.layout import ExpertJobs, PackPlan, write_pack  # noqa: E402
from edgemoe.pack.stream import CHUNK_BYTES, TensorJob, write_gguf  # noqa: E402
from edgemoe.qtensor import row_bytes  # noqa: E402

# HF model_type → GGUF general.architecture
GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe",
             "gpt_oss": "gpt-oss", "deepseek_v2": "deepseek2"}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int  # D
    intermediate: int  # I, per routed expert
    heads: int  # H
    kv_heads: int  # KV
    head_dim: int
    experts: int  # E
    top_k: int
    context: int
    rope_theta: float
    family: str = "mixtral"  # HF model_type: mixtral, qwen3_moe, qwen2_moe, olmoe, gpt_oss
    shared: int = 0  # S, the shared expert's width (qwen2_moe)
    dense_ff: int | None = None  # the config's intermediate_size when it is not the experts' width (qwen)
    eps: float = 1e-5  # rms_norm_eps
    window: int = 0  # sliding window of every other layer (gpt_oss)
    yarn: tuple[float, int] | None = None  # YaRN (factor, original context) (gpt_oss, deepseek_v2)
    mla: tuple[int, int, int, int] | None = None  # (kv_lora_rank, nope, rope, v head dims) (deepseek_v2)
    dense_first: int = 0  # leading dense layers of width dense_ff (deepseek_v2)
    mscale: float = 0.0  # YaRN mscale_all_dim (deepseek_v2)


PRESETS = {
    "tiny": Shape(2, 256, 512, 8, 2, 32, 8, 2, 2048, 1e6),
    "mixtral-8x7b": Shape(32, 4096, 14336, 32, 8, 128, 8, 2, 32768, 1e6),
    "qwen3-30b-a3b": Shape(48, 2048, 768, 32, 4, 128, 128, 8, 40960, 1e6, family="qwen3_moe", dense_ff=6144,
                           eps=1e-6),
    "olmoe-1b-7b": Shape(16, 2048, 1024, 16, 16, 128, 64, 8, 4096, 1e4, family="olmoe"),
    "qwen1.5-moe-a2.7b": Shape(24, 2048, 1408, 16, 16, 128, 60, 4, 8192, 1e6, family="qwen2_moe", shared=5632,
                               dense_ff=5632, eps=1e-6),
    "gpt-oss-20b": Shape(24, 2880, 2880, 64, 8, 64, 32, 4, 131072, 150000.0, family="gpt_oss", window=128,
                         yarn=(32.0, 4096)),
    "deepseek-v2-lite": Shape(27, 2048, 1408, 16, 16, 192, 64, 6, 163840, 1e4, family="deepseek_v2",
                              shared=2 * 1408, dense_ff=10944, eps=1e-6, yarn=(40.0, 4096), mla=(512, 128, 64, 128),
                              dense_first=1, mscale=0.707),
}
EXPERT_TYPES = ("Q4_0", "Q4_K", "Q8_0", "MXFP4", "F16", "F32")
DENSE_TYPES = ("Q8_0", "F16", "F32")
MIXES = {"q4_k_m": ("Q4_K", "Q8_0"), "legacy": ("Q4_0", "Q8_0"), "mxfp4": ("MXFP4", "Q8_0")}  # (experts, dense)
Q4_K_FALLBACK = Q.Q5_0  # llama.cpp's quantiser's, for rows that are not whole 256-value super-blocks
_WIDTH_STEP = 256  # hidden sizes (and widths that were multiples of it) stay multiples of the Q4_K super-block
_BIAS_STD = 0.1
_SINK_STD = 0.5
_HEADS_SPAN_HIDDEN = ("olmoe", "qwen2_moe")  # llama.cpp's graphs take q rows = hidden

# Per block type: byte offset of the f16 scale d, and E[level²] of the random levels it multiplies,
# so that |d| = 1 / sqrt(cols · E[level²]) gives values of variance 1/cols.
#   Q4_0: level = q - 8, q uniform in 0..15            → E = 344/16 = 21.5
#   Q8_0: level = q, q uniform int8                     → E = 5461.5
#   Q4_K: level = 8·(q - 7.5) (sub-block scales and mins fixed at 8, dmin = 7.5·d) → E = 64 · 21.25
#   Q5_0: level = q - 16, q uniform in 0..31 (4 low bits in qs, the fifth in qh) → E = 2736/32 = 85.5
_LEVEL_SQ = {Q.Q4_0: 21.5, Q.Q8_0: 5461.5, Q.Q4_K: 64 * 21.25, Q.Q5_0: 85.5}
# Q4_K scales[12] with all eight 6-bit scales and mins = 8 (get_scale_min_k4's packing).
_Q4_K_SCALES = np.array([8, 8, 8, 8, 8, 8, 8, 8, 0x88, 0x88, 0x88, 0x88], dtype=np.uint8)
_FILE_TYPE = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
              Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
              Q.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE}
# MXFP4: a block is one E8M0 exponent byte e, then 16 bytes of 4-bit codes whose values are
# kvalues[code] · 2^(e - 128), kvalues = ±{0, 1, 2, 3, 4, 6, 8, 12} (E[kvalue²] = 34.25)
_MXFP4_LEVEL_SQ = 34.25


def scaled(shape: Shape, scale: float = 1.0, layers: int | None = None, experts: int | None = None) -> Shape:
    """Widths × `scale` (hidden, expert/shared/dense widths, head counts; head_dim kept), optionally another
    depth and expert count."""
    if not 0 < scale <= 4:
        raise ValueError(f"--scale must be in (0, 4], got {scale}")

    def width(n: int) -> int:
        step = _WIDTH_STEP if n % _WIDTH_STEP == 0 else 32
        return max(step, round(n * scale / step) * step)

    hidden = width(shape.hidden)
    if shape.family in _HEADS_SPAN_HIDDEN:  # heads · head_dim == hidden, kv heads in the same proportion
        if hidden % shape.head_dim:
            raise ValueError(f"hidden {hidden} is not a multiple of head_dim {shape.head_dim}")
        heads = hidden // shape.head_dim
        kv = max(1, heads * shape.kv_heads // shape.heads)
    else:
        heads = max(1, round(shape.heads * scale))
        kv = max(1, min(heads, round(shape.kv_heads * scale)))
    while heads % kv:
        kv -= 1
    n_layers = shape.layers if layers is None else layers
    if n_layers < 1:
        raise ValueError(f"--layers must be at least 1, got {n_layers}")
    n_experts = shape.experts if experts is None else experts
    if n_experts < 1:
        raise ValueError(f"--experts must be at least 1, got {n_experts}")
    inter = width(shape.intermediate)
    shared = width(shape.shared) if shape.shared else 0
    if shape.mla:  # DeepSeek's shared experts are a count of routed-width experts; its kv heads are its heads
        shared, kv = shape.shared // shape.intermediate * inter, heads
    return replace(shape, layers=n_layers, hidden=hidden, intermediate=inter, heads=heads,
                   kv_heads=kv, experts=n_experts, top_k=min(shape.top_k, n_experts), shared=shared,
                   dense_first=min(shape.dense_first, n_layers),
                   dense_ff=width(shape.dense_ff) if shape.dense_ff else None)


def storage_type(qtype: Q, cols: int) -> Q:
    """`qtype`, or its fallback when a row of `cols` is not whole blocks: Q4_K → Q5_0 (as llama.cpp), else F16."""
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    if qtype == Q.Q4_K and cols % GGML_QUANT_SIZES[Q4_K_FALLBACK][0] == 0:
        return Q4_K_FALLBACK
    return Q.F16


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
    if qtype == Q.MXFP4:  # symmetric codes (zero mean); a power-of-two scale, the nearest to the target
        blocks[:, 0] = 128 + round(math.log2(1 / math.sqrt(cols * _MXFP4_LEVEL_SQ)))
        return blocks.reshape(rows, -1)
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
    else:  # Q4_0, Q5_0, Q8_0: d is the first uint16
        head = blocks.view(np.uint16)  # (B, size / 2)
        head[:, 0] = (head[:, 0] & np.uint16(0x8000)) | np.uint16(d)
    return blocks.reshape(rows, -1)


def _seed(base: int, name: str, *more: int) -> list[int]:
    return [base, zlib.crc32(name.encode()), *more]


def _matrix_chunks(qtype: Q, rows: int, cols: int, seed: list[int]) -> Iterator[np.ndarray]:
    """One matrix's random rows, a chunk at a time; the same bytes for the same seed whatever the caller."""
    rng = np.random.default_rng(seed)
    step = max(1, CHUNK_BYTES // row_bytes(qtype, cols))
    for r in range(0, rows, step):
        yield random_rows(rng, qtype, min(step, rows - r), cols)


def _ahead(chunks, pool: ThreadPoolExecutor | None):
    """`chunks` (a generator function) with the next chunk generated by `pool` while the caller writes."""
    if pool is None:
        return chunks

    def gen() -> Iterator[np.ndarray]:
        it = chunks()
        pending = pool.submit(next, it, None)
        while (chunk := pending.result()) is not None:
            pending = pool.submit(next, it, None)
            yield chunk

    return gen


def random_job(name: str, qtype: Q, shape: tuple[int, ...], seed: list[int],
               pool: ThreadPoolExecutor | None = None) -> TensorJob:
    """A tensor of random rows, generated a chunk at a time (the same bytes on every run with `seed`).

    With `pool` (one worker), the next chunk is generated while the caller writes the current one."""
    rows = int(np.prod(shape[:-1]))
    return TensorJob(name, qtype, shape, _ahead(lambda: _matrix_chunks(qtype, rows, shape[-1], seed), pool))


def merged_experts_job(name: str, qtype: Q, shape: tuple[int, int, int], base_seed: int,
                       pool: ThreadPoolExecutor | None = None) -> TensorJob:
    """An (E, out, in) tensor whose expert e holds the bytes `expert_job(name, …, e)` gives (packs match it)."""
    E, rows, cols = shape

    def chunks() -> Iterator[np.ndarray]:
        batch: list[np.ndarray] = []
        size = 0
        for e in range(E):
            for chunk in _matrix_chunks(qtype, rows, cols, _seed(base_seed, name, e)):
                batch.append(chunk)
                size += chunk.nbytes
                if size >= CHUNK_BYTES:
                    yield np.concatenate(batch)
                    batch, size = [], 0
        if batch:
            yield np.concatenate(batch)

    return TensorJob(name, qtype, shape, _ahead(chunks, pool))


def expert_job(merged_name: str, name: str, qtype: Q, shape: tuple[int, int], e: int, base_seed: int,
               pool: ThreadPoolExecutor | None = None) -> TensorJob:
    return TensorJob(name, qtype, shape,
                     _ahead(lambda: _matrix_chunks(qtype, *shape, _seed(base_seed, merged_name, e)), pool))


def const_job(name: str, value: float, n: int) -> TensorJob:
    v = np.full(n, value, dtype=np.float32)  # (n,)
    return TensorJob(name, Q.F32, (n,), lambda: (v,))


def bias_job(name: str, n: int | tuple[int, ...], base_seed: int, std: float = _BIAS_STD) -> TensorJob:
    shape = (n,) if isinstance(n, int) else n
    v = (np.random.default_rng(_seed(base_seed, name)).standard_normal(shape, dtype=np.float32)
         * np.float32(std))  # shape
    return TensorJob(name, Q.F32, shape, lambda: (v,))


# ------------------------------------------------------------------------------------------ the model

def model_jobs(s: Shape, expert_type: Q, dense_type: Q, seed: int, packed: bool,
               pool: ThreadPoolExecutor | None = None):
    """(dense jobs in file order, experts) for a pack, or (all jobs in the converter's order, []) otherwise."""
    D, I, E, S, V = s.hidden, s.intermediate, s.experts, s.shared, len(vocabulary()[0])
    q_rows, kv_rows = s.heads * s.head_dim, s.kv_heads * s.head_dim
    fam = s.family

    def rand(name: str, qtype: Q, *shape: int) -> TensorJob:
        return random_job(name, storage_type(qtype, shape[-1]), shape, _seed(seed, name), pool)

    dense: list[TensorJob] = [rand("token_embd.weight", dense_type, V, D)]
    experts: list[ExpertJobs] = []
    # the converter stacks Mixtral's experts as w1, w2, w3 and the others' as down_proj, gate_proj, up_proj
    order = ("gate", "down", "up") if fam == "mixtral" else ("down", "gate", "up")
    for i in range(s.layers):
        dense.append(const_job(f"blk.{i}.attn_norm.weight", 1.0, D))
        if s.mla:
            dense += _mla_attention(s, i, rand, dense_type)
            dense.append(const_job(f"blk.{i}.ffn_norm.weight", 1.0, D))
            if i < s.dense_first:  # a dense MLP layer, in the experts' type
                F = s.dense_ff
                dense += [rand(f"blk.{i}.ffn_gate.weight", expert_type, F, D),
                          rand(f"blk.{i}.ffn_up.weight", expert_type, F, D),
                          rand(f"blk.{i}.ffn_down.weight", expert_type, D, F)]
                continue
            dense.append(rand(f"blk.{i}.ffn_gate_inp.weight", Q.F32, E, D))
            _routed(dense, experts, s, i, expert_type, seed, packed, pool, ("down", "gate", "up"))
            dense += [rand(f"blk.{i}.ffn_gate_shexp.weight", expert_type, S, D),
                      rand(f"blk.{i}.ffn_up_shexp.weight", expert_type, S, D),
                      rand(f"blk.{i}.ffn_down_shexp.weight", expert_type, D, S)]
            continue
        for part, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            dense.append(rand(f"blk.{i}.attn_{part}.weight", dense_type, rows, D))
            if fam in ("qwen2_moe", "gpt_oss"):
                dense.append(bias_job(f"blk.{i}.attn_{part}.bias", rows, seed))
        dense.append(rand(f"blk.{i}.attn_output.weight", dense_type, D, q_rows))
        if fam == "gpt_oss":  # the output bias and each head's sink logit
            dense += [bias_job(f"blk.{i}.attn_output.bias", D, seed),
                      bias_job(f"blk.{i}.attn_sinks.weight", s.heads, seed, _SINK_STD)]
        if fam == "qwen3_moe":  # RMSNorm over each head
            dense += [const_job(f"blk.{i}.attn_q_norm.weight", 1.0, s.head_dim),
                      const_job(f"blk.{i}.attn_k_norm.weight", 1.0, s.head_dim)]
        elif fam == "olmoe":  # RMSNorm over the whole q and k projections
            dense += [const_job(f"blk.{i}.attn_q_norm.weight", 1.0, q_rows),
                      const_job(f"blk.{i}.attn_k_norm.weight", 1.0, kv_rows)]
        norm = "post_attention_norm" if fam == "gpt_oss" else "ffn_norm"
        dense += [const_job(f"blk.{i}.{norm}.weight", 1.0, D), rand(f"blk.{i}.ffn_gate_inp.weight", Q.F32, E, D)]
        if fam == "gpt_oss":  # router and expert biases (F32, as the converter writes them)
            dense += [bias_job(f"blk.{i}.ffn_gate_inp.bias", E, seed),
                      bias_job(f"blk.{i}.ffn_gate_exps.bias", (E, I), seed),
                      bias_job(f"blk.{i}.ffn_up_exps.bias", (E, I), seed),
                      bias_job(f"blk.{i}.ffn_down_exps.bias", (E, D), seed)]
        _routed(dense, experts, s, i, expert_type, seed, packed, pool, order)
        if S:  # qwen2_moe's shared expert and its sigmoid gate, (1, D) as the converter writes it
            dense += [rand(f"blk.{i}.ffn_gate_inp_shexp.weight", Q.F32, 1, D),
                      rand(f"blk.{i}.ffn_gate_shexp.weight", expert_type, S, D),
                      rand(f"blk.{i}.ffn_up_shexp.weight", expert_type, S, D),
                      rand(f"blk.{i}.ffn_down_shexp.weight", expert_type, D, S)]
    dense += [const_job("output_norm.weight", 1.0, D), rand("output.weight", dense_type, V, D)]
    return dense, experts


def _mla_attention(s: Shape, i: int, rand, dense_type: Q) -> list[TensorJob]:
    """DeepSeek-V2's latent attention as the converter writes it without q compression (V2-Lite)."""
    D, H = s.hidden, s.heads
    R, n, r, v = s.mla
    return [rand(f"blk.{i}.attn_q.weight", dense_type, H * (n + r), D),
            rand(f"blk.{i}.attn_kv_a_mqa.weight", dense_type, R + r, D),
            const_job(f"blk.{i}.attn_kv_a_norm.weight", 1.0, R),
            rand(f"blk.{i}.attn_k_b.weight", dense_type, H, R, n),
            rand(f"blk.{i}.attn_v_b.weight", dense_type, H, v, R),
            rand(f"blk.{i}.attn_output.weight", dense_type, D, H * v)]


def _routed(dense: list, experts: list, s: Shape, i: int, expert_type: Q, seed: int, packed: bool, pool,
            order: tuple[str, ...]) -> None:
    """Layer i's routed experts: merged tensors in `order` appended to `dense`, or one ExpertJobs per expert."""
    D, I, E = s.hidden, s.intermediate, s.experts
    out_in = {"gate": (I, D), "up": (I, D), "down": (D, I)}
    merged = {p: GGUF_EXPERTS[p].format(i=i) for p in out_in}
    types = {p: storage_type(expert_type, out_in[p][1]) for p in out_in}
    if packed:
        for e in range(E):
            j = {p: expert_job(merged[p], GGUF_EXPERT_SPLIT[p].format(i=i, e=e), types[p], out_in[p], e, seed,
                               pool) for p in out_in}
            experts.append(ExpertJobs(i, e, j["gate"], j["up"], j["down"]))
    else:
        dense += [merged_experts_job(merged[p], types[p], (E, *out_in[p]), seed, pool) for p in order]


def file_type(expert_type: Q, dense_type: Q) -> LlamaFileType:
    if expert_type == dense_type == Q.F32:
        return LlamaFileType.ALL_F32
    return _FILE_TYPE[expert_type]


def new_writer(s: Shape, name: str, expert_type: Q, dense_type: Q | None = None) -> GGUFWriter:
    """A GGUFWriter holding the metadata llama.cpp's converter writes for the family (Mixtral: what
    gguf_export writes), and the default model's vocabulary."""
    n_vocab = len(vocabulary()[0])
    dense_type = Q.Q8_0 if dense_type is None else dense_type
    if s.family == "mixtral":
        cfg = {"architectures": ["MixtralForCausalLM"], "_name_or_path": name, "num_hidden_layers": s.layers,
               "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_attention_heads": s.heads,
               "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "num_local_experts": s.experts,
               "num_experts_per_tok": s.top_k, "vocab_size": n_vocab, "rms_norm_eps": s.eps,
               "max_position_embeddings": s.context, "rope_theta": s.rope_theta, "tie_word_embeddings": False}
        w = GGUFWriter(None, "llama")
        _add_metadata(w, _Hparams.from_config(cfg), cfg, expert_type)
    else:
        w = _family_writer(s, name, file_type(expert_type, dense_type))
    with tempfile.TemporaryDirectory() as d:
        vocab_path = os.path.join(d, "vocab.gguf")
        write_vocab(vocab_path)
        for key, (value, vtype, sub) in _read_tokenizer(vocab_path, n_vocab).items():
            w.add_key_value(key, value, vtype, sub)
    return w


def _family_writer(s: Shape, name: str, ftype: LlamaFileType) -> GGUFWriter:
    """TextModel.set_gguf_parameters of convert_hf_to_gguf.py for the family's config, then its own keys."""
    w = GGUFWriter(None, GGUF_ARCH[s.family])
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.dense_ff or s.intermediate)  # config intermediate_size (olmoe: the experts')
    w.add_head_count(s.heads)
    w.add_head_count_kv(1 if s.mla else s.kv_heads)  # DeepSeek: the latent is one shared "head"
    w.add_rope_freq_base(float(s.rope_theta))
    w.add_layer_norm_rms_eps(1e-5 if s.family == "olmoe" else float(s.eps))  # OlmoeModel forces 1e-5
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.top_k)
    if s.yarn:  # GptOssModel: rope_scaling of type yarn
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s.yarn[0]))
        w.add_rope_scaling_orig_ctx_len(int(s.yarn[1]))
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
    if s.family in ("qwen3_moe", "gpt_oss"):  # written when config.json has head_dim (Qwen2/OLMoE's has not)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_file_type(ftype)
    if s.mla:  # DeepseekV2Model.set_gguf_parameters: the cache's key is the latent plus the rope key
        R, n, r, v = s.mla
        w.add_key_length(R + r)
        w.add_value_length(R)
        w.add_leading_dense_block_count(s.dense_first)
        w.add_vocab_size(len(vocabulary()[0]))
        w.add_kv_lora_rank(R)
        w.add_key_length_mla(n + r)
        w.add_value_length_mla(v)
        w.add_expert_feed_forward_length(s.intermediate)
        w.add_expert_shared_count(s.shared // s.intermediate)
        w.add_expert_weights_scale(1.0)
        w.add_rope_dimension_count(r)
        w.add_rope_scaling_yarn_log_mul(0.1 * s.mscale)
    if s.window:
        w.add_sliding_window(s.window)
    if s.family in ("qwen3_moe", "qwen2_moe", "gpt_oss"):  # Qwen2MoeModel / GptOssModel.set_gguf_parameters
        w.add_expert_feed_forward_length(s.intermediate)
        if s.shared:
            w.add_expert_shared_feed_forward_length(s.shared)
    w.add_quantization_version(GGML_QUANT_VERSION)
    return w


def resolve_types(shape: Shape, mix: str | None = None, expert_quant: str | None = None,
                  dense_quant: str | None = None) -> tuple[str, str]:
    """(expert type, dense type): explicit types over the mix, the mix over the preset's default (q4_k_m for
    the Qwen and OLMoE families, legacy Q4_0/Q8_0 for Mixtral)."""
    default = {"mixtral": "legacy", "gpt_oss": "mxfp4"}.get(shape.family, "q4_k_m")
    e, d = MIXES[mix or default]
    return expert_quant or e, dense_quant or d


def synthesize(path: str, shape: Shape, *, name: str, expert_quant: str = "Q4_0", dense_quant: str = "Q8_0",
               packed: bool = False, seed: int = 0, progress: bool | None = None) -> int:
    """Write the model at `path` (via `path.tmp`; with --packed also its manifest); return its size in bytes."""
    if expert_quant not in EXPERT_TYPES or dense_quant not in DENSE_TYPES:
        raise ValueError(f"expert quant must be one of {EXPERT_TYPES}, dense one of {DENSE_TYPES}")
    if shape.family not in GGUF_ARCH:
        raise ValueError(f"family must be one of {sorted(GGUF_ARCH)}, got {shape.family!r}")
    if shape.family == "mixtral" and shape.shared:
        raise ValueError("a Mixtral has no shared expert")
    if packed and shape.family == "gpt_oss":
        raise ValueError("--packed is not written for gpt-oss (its expert biases); write the unpacked file")
    expert_type, dense_type = Q[expert_quant], Q[dense_quant]
    writer = new_writer(shape, name, expert_type, dense_type)
    with ThreadPoolExecutor(1) as pool:  # generates while the main thread writes (and checksums)
        return _write(path, writer, *model_jobs(shape, expert_type, dense_type, seed, packed, pool), shape=shape,
                      name=name, packed=packed, progress=progress)


def _write(path: str, writer: GGUFWriter, dense: list[TensorJob], experts: list[ExpertJobs], *, shape: Shape,
           name: str, packed: bool, progress: bool | None) -> int:
    if packed:
        model = {"name": name, "architecture": GGUF_ARCH[shape.family], "num_hidden_layers": shape.layers,
                 "num_local_experts": shape.experts, "num_experts_per_tok": shape.top_k,
                 "hidden_size": shape.hidden, "intermediate_size": shape.intermediate}
        plan = PackPlan(writer, dense, experts, f"synthetic:{name}", "synthetic", model)
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
    p.add_argument("preset", choices=sorted(PRESETS), help="model shape and family")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.add_argument("--scale", type=float, default=1.0, help="width factor (hidden, widths, heads), e.g. 0.25")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--experts", type=int, default=None, help="number of routed experts (default: the preset's)")
    p.add_argument("--mix", choices=sorted(MIXES), default=None,
                   help="q4_k_m: Q4_K experts (Q5_0 where rows are not whole super-blocks), Q8_0 dense; legacy: "
                        "Q4_0 experts, Q8_0 dense; mxfp4: MXFP4 experts, Q8_0 dense (default: q4_k_m for the "
                        "Qwen/OLMoE presets, legacy for Mixtral, mxfp4 for gpt-oss)")
    p.add_argument("--expert-quant", choices=EXPERT_TYPES, default=None, help="routed (and shared) experts' type")
    p.add_argument("--dense-quant", choices=DENSE_TYPES, default=None, help="attention/embedding/output type")
    p.add_argument("--as-mixtral", action="store_true",
                   help="write the preset's shape as a Mixtral (arch llama: no q/k norms, biases or shared "
                        "expert), the approximation BENCHMARKS.md sections 1-9 used")
    p.add_argument("--packed", action="store_true", help="write the expert-pack layout and its manifest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.as_mixtral:
        preset = replace(preset, family="mixtral", shared=0, dense_ff=None)
    try:
        shape = scaled(preset, args.scale, args.layers, args.experts)
    except ValueError as e:
        p.error(str(e))
    expert_quant, dense_quant = resolve_types(shape, args.mix, args.expert_quant, args.dense_quant)
    name = (args.preset + (f"@{args.scale:g}x" if args.scale != 1 else "") + (f"-{shape.layers}L" if args.layers else "")
            + (f"-{shape.experts}E" if args.experts else "") + ("-as-mixtral" if args.as_mixtral else ""))
    print(f"{name} ({GGUF_ARCH[shape.family]}, experts {expert_quant}, dense {dense_quant}): {shape}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        size = synthesize(args.output, shape, name=name, expert_quant=expert_quant, dense_quant=dense_quant,
                          packed=args.packed, seed=args.seed, progress=False if args.quiet else None)
    except ValueError as e:  # a combination of options the tool does not write
        p.error(str(e))
    dt = time.perf_counter() - t0
    print(f"wrote {args.output}: {size / 1e9:.2f} GB in {dt:.1f} s ({size / 1e9 / dt:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
