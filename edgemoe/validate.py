"""Checks of a model file before any kernel touches it.

A file is never trusted: its metadata (counts, sizes, constants) and every tensor (type, shape, byte size,
extent inside the file) are checked against what the architecture needs, and every failure is one
ModelFormatError/UnsupportedError naming the field or tensor. Kernels index weights by the model's shape
alone, so a tensor smaller than that shape would make them read past it.

Legend as in models/moe.py: D hidden, V vocabulary, H/K query/key-value heads, d head_dim,
E experts, I expert width, L layers.
"""

from __future__ import annotations

import math
import os
import re
import stat
from numbers import Integral, Real

import numpy as np
from gguf import GGML_QUANT_SIZES

from .errors import ModelFormatError, UnsupportedError
from .formats import names
from .qtensor import QTensor, check_supported, row_bytes

MAX_EXPERTS_PER_TOK = 16  # the largest routed top-k of released MoE models is 8-10; kernels unroll per expert
LIMITS = {  # field → (smallest, largest) accepted; beyond these a file is corrupt, not a model
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "num_local_experts": (1, 4096),
    "num_experts_per_tok": (1, MAX_EXPERTS_PER_TOK),
    "head_dim": (2, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "shared_expert_intermediate_size": (0, 1 << 18),
    "dense_intermediate_size": (0, 1 << 18),
    "kv_lora_rank": (0, 1 << 16),  # DeepSeek's latent attention (0: none)
    "q_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (0, 4096),
    "qk_rope_head_dim": (0, 4096),
    "v_head_dim": (0, 4096),
    "n_group": (1, 4096),
    "topk_group": (1, 4096),
    "sliding_window": (0, 1 << 24),
}
FLOATS = ("rms_norm_eps", "rope_theta")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_local_experts", "num_experts_per_tok")


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_regular_file(path: str) -> None:
    """A model must be a regular file (or a checkpoint directory): a FIFO or a device would block or stream."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e.strerror}); pass a .gguf file or an HF checkpoint "
                               "directory") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ModelFormatError(f"{path}: not a regular file; pass a .gguf file or an HF checkpoint directory")


def check_config(cfg: dict, where: str) -> dict:
    """The model's shape and constants (HF config names) → the same dict, or one error naming the field.

    Types are strict (a count is an int, never a bool, a string or a float); counts are positive and
    bounded; eps and rope base finite and positive; heads, head_dim and experts consistent."""
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{where}: the model configuration is a {type(cfg).__name__}, not a mapping; "
                               "restore the model's config")
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise ModelFormatError(f"{where}: the model configuration lacks {', '.join(missing)}; convert the model again")
    cfg = dict(cfg)
    for rope in (cfg.get("rope_parameters"), cfg.get("rope_scaling")):  # HF keeps rope_theta here too
        if isinstance(rope, dict) and cfg.get("rope_theta") is None and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
    for key, (lo, hi) in LIMITS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ModelFormatError(f"{where}: {key} must be an integer, found {_show(v)}; the file is corrupt")
        if not lo <= int(v) <= hi:
            if key == "num_experts_per_tok" and int(v) > hi:
                raise UnsupportedError(f"{where}: {key} {int(v)} is more than the {hi} routed experts per token "
                                       "edgemoe supports")
            raise ModelFormatError(f"{where}: {key} is {int(v)}, outside {lo}..{hi}; the file is corrupt")
        cfg[key] = int(v)
    for key in FLOATS:
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or float(v) <= 0:
            raise ModelFormatError(f"{where}: {key} must be a finite positive number, found {_show(v)}; "
                                   "the file is corrupt")
        cfg[key] = float(v)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv:
        raise ModelFormatError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; "
                               "the file is corrupt")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise ModelFormatError(f"{where}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                               f"{heads} and no head_dim is given; the file is corrupt")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim % 2:
        raise ModelFormatError(f"{where}: head_dim {head_dim} is odd; rotary embeddings need an even head size")
    if cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
        raise ModelFormatError(f"{where}: {cfg['num_experts_per_tok']} experts per token of "
                               f"{cfg['num_local_experts']}; num_experts_per_tok must not exceed num_local_experts")
    for key in ("tie_word_embeddings",):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise ModelFormatError(f"{where}: {key} must be true or false, found {_show(cfg[key])}")
    for key in ("bos_token_id", "eos_token_id"):
        ids = cfg.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is None:
                continue
            if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= int(i) < cfg["vocab_size"]:
                raise ModelFormatError(f"{where}: {key} {_show(ids)} is not a token of the vocabulary "
                                       f"(0..{cfg['vocab_size'] - 1}); the file is corrupt")
    return cfg


# ---------------------------------------------------------------------------------------------- GGUF

_LAYER = re.compile(r"^blk\.(\d+)\.")


def gguf_shapes(args) -> dict[str, tuple[int, ...]]:
    """Every tensor name a GGUF of the model's family may hold → its ggml shape (ne[0] = columns first).
    Experts appear twice (merged `*_exps` and per-expert names); a file holds one of the two."""
    from .models.arch import spec_of

    D, V, I, E = args.hidden_size, args.vocab_size, args.intermediate_size, args.num_local_experts
    d, S, F = args.head_dim, args.shared_expert_intermediate_size, args.dense_intermediate_size
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (D, V), "output_norm.weight": (D,),
                                       "output.weight": (D, V)}
    head = args.qk_norm == "head"
    H, Q, R = args.num_attention_heads, args.q_lora_rank or 0, args.kv_lora_rank
    n, r, v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    parts = {"attn_norm": (D,), "q": (D, q), "k": (D, kv), "v": (D, kv), "o": (q, D), "ffn_norm": (D,),
             "router": (D, E), "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "o_bias": (D,),
             "q_norm": (d,) if head else (q,), "k_norm": (d,) if head else (kv,),
             "shexp_gate": (D, S), "shexp_up": (D, S), "shexp_down": (S, D), "shexp_router": (D,),
             "mlp_gate": (D, F), "mlp_up": (D, F), "mlp_down": (F, D), "router_bias": (E,),
             "sinks": (args.num_attention_heads,), "router_b": (E,), "exp_gate_b": (I, E), "exp_up_b": (I, E),
             "exp_down_b": (D, E)}
    if R:  # DeepSeek's latent attention
        parts.update(q=(D, H * (n + r)), q_a=(D, Q), q_a_norm=(Q,), q_b=(Q, H * (n + r)), kv_a=(D, R + r),
                     kv_a_norm=(R,), kv_b=(R, H * (n + v)), k_b=(n, R, H), v_b=(R, v, H), o=(H * v, D))
    spec = spec_of(args)
    experts = {"ffn_gate_exps": (D, I, E), "ffn_up_exps": (D, I, E), "ffn_down_exps": (I, D, E)}
    for i in range(args.num_hidden_layers):
        for part in spec.layer_parts(args, i):
            out[spec.gguf_name(part).format(i=i)] = parts[part]
            if part == "kv_b":  # or, in current files, split per head
                for half in ("k_b", "v_b"):
                    out[spec.gguf_name(half).format(i=i)] = parts[half]
        if not args.is_moe(i):
            continue
        for part, shape in experts.items():
            out[f"blk.{i}.{part}.weight"] = shape
        for e in range(E):
            out[f"blk.{i}.ffn_gate.{e}.weight"] = (D, I)
            out[f"blk.{i}.ffn_up.{e}.weight"] = (D, I)
            out[f"blk.{i}.ffn_down.{e}.weight"] = (I, D)
    return out


def check_gguf_tensors(tensors: dict, args, path: str, file_size: int, data_start: int, alignment: int) -> None:
    """Every tensor of the file: known to the architecture, of a supported type, of the shape the metadata
    implies, its bytes inside the file; every layer's tensors present, and none beyond the layer count.

    The tensors must also tile the data section as GGUF writers lay it out (each at an aligned offset, no
    overlaps, no gap of an alignment or more): a corrupted type or shape that changes a tensor's size then
    shows as an overlap or a hole instead of weights read as the wrong format."""
    want = gguf_shapes(args)
    spans = []
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= args.num_hidden_layers:
            raise ModelFormatError(f"{path}: tensor {name} belongs to layer {m.group(1)} but the metadata says "
                                   f"{args.num_hidden_layers} layers (block_count); the file is inconsistent")
        if name not in want:
            from .models.arch import spec_of

            raise UnsupportedError(f"{path}: tensor {name} is not part of a {spec_of(args).title} model; the file is "
                                   "for another architecture or variant")
        shape = tuple(int(x) for x in t.shape)
        vector_as_matrix = len(want[name]) == 1 and shape == want[name] + (1,)  # the converter writes some so
        if shape != want[name] and not vector_as_matrix:
            raise ModelFormatError(f"{path}: tensor {name} has shape {shape} but the metadata implies {want[name]}; "
                                   "the file is inconsistent, convert it again")
        qtype = check_supported(t.tensor_type, f"{path}: tensor {name}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if shape[0] % block:
            raise ModelFormatError(f"{path}: tensor {name} has rows of {shape[0]} values, not whole {qtype.name} "
                                   f"blocks of {block}; the file is corrupt")
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        start = int(t.data_offset)
        if start < 0 or start + n_bytes > file_size or np.asarray(t.data).nbytes != n_bytes:
            raise ModelFormatError(f"{path}: tensor {name} ({n_bytes} bytes at offset {start}) extends past the end "
                                   f"of the file ({file_size} bytes); the file is truncated or corrupt")
        if (start - data_start) % alignment:
            raise ModelFormatError(f"{path}: tensor {name} starts at offset {start}, not aligned to {alignment} bytes; "
                                   "the file is corrupt")
        spans.append((start, start + n_bytes, name))
    for name in _required(tensors, args):
        if name not in tensors:
            raise ModelFormatError(f"{path}: tensor {name} is missing; the file is incomplete or of another variant")
    _check_tiling(sorted(spans), path, file_size, data_start, alignment)


def _required(tensors: dict, args) -> list[str]:
    from .models.arch import spec_of

    out = ["token_embd.weight", "output_norm.weight"]
    spec = spec_of(args)
    for i in range(args.num_hidden_layers):
        for p in spec.layer_parts(args, i):
            if p == "kv_b" and spec.gguf_name("k_b").format(i=i) in tensors:
                out += [spec.gguf_name(h).format(i=i) for h in ("k_b", "v_b")]
            else:
                out.append(spec.gguf_name(p).format(i=i))
        if not args.is_moe(i):
            continue
        if any(names.GGUF_EXPERTS[p].format(i=i) in tensors for p in ("gate", "up", "down")):
            out += [names.GGUF_EXPERTS[p].format(i=i) for p in ("gate", "up", "down")]
        else:
            out += [names.GGUF_EXPERT_SPLIT[p].format(i=i, e=e) for e in range(args.num_local_experts)
                    for p in ("gate", "up", "down")]
    return out


def _check_tiling(spans: list, path: str, file_size: int, data_start: int, alignment: int) -> None:
    end, prev = data_start, "the tensor table"
    for start, stop, name in spans:
        if start < end:
            raise ModelFormatError(f"{path}: tensor {name} overlaps {prev}; the file's tensor table is corrupt")
        if start - end >= alignment:
            raise ModelFormatError(f"{path}: {start - end} bytes between {prev} and tensor {name} belong to no tensor; "
                                   "the file's tensor table is corrupt")
        end, prev = stop, f"tensor {name}"
    if file_size - end >= alignment:
        raise ModelFormatError(f"{path}: {file_size - end} bytes after {prev} belong to no tensor; the file's tensor "
                               "table is corrupt")


# ------------------------------------------------------------------------------------------ any format

def _check_latent_attention(layer, args, i: int, vector, matrix, path: str) -> None:
    """DeepSeek's multi-head latent attention: the projections' shapes and the up-projections'."""
    D, H, R = args.hidden_size, args.num_attention_heads, args.kv_lora_rank
    n, r, v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    ex = layer.extra
    if args.q_lora_rank is None:
        matrix(f"layer {i} q_proj", layer.q_proj, H * (n + r), D)
    else:
        matrix(f"layer {i} q_a_proj", ex.get("q_a"), args.q_lora_rank, D)
        vector(f"layer {i} q_a_layernorm", ex.get("q_a_norm"), args.q_lora_rank)
        matrix(f"layer {i} q_b_proj", ex.get("q_b"), H * (n + r), args.q_lora_rank)
    matrix(f"layer {i} kv_a_proj_with_mqa", ex.get("kv_a"), R + r, D)
    vector(f"layer {i} kv_a_layernorm", ex.get("kv_a_norm"), R)
    matrix(f"layer {i} o_proj", layer.o_proj, D, H * v)
    for name, shape in (("w_uk", (H, n, R)), ("w_uv", (H, v, R))):
        w = ex.get(name)
        if not isinstance(w, np.ndarray) or w.shape != shape or not np.isfinite(w).all():
            raise ModelFormatError(f"{path}: layer {i} kv_b_proj does not give {name} of shape {shape} with finite "
                                   "values; the file is inconsistent, convert it again")


def check_weights(weights, experts: list | None, args, path: str) -> None:
    """The tensors as the model will use them: vectors of D finite floats, matrices of the model's shape
    whose storage holds exactly their rows (a view shorter than its shape would be read past)."""
    D = args.hidden_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim

    from .models.arch import spec_of

    def vector(name: str, v, n: int = D) -> None:
        if not isinstance(v, np.ndarray) or v.shape != (n,):
            shape = getattr(v, "shape", None)
            raise ModelFormatError(f"{path}: {name} has shape {shape} but the model needs ({n},); the file is "
                                   "inconsistent, convert it again")
        if not np.isfinite(v).all():
            raise ModelFormatError(f"{path}: {name} holds NaN or infinite values; the file is corrupt, download or "
                                   "convert it again")

    def matrix(name: str, w, rows: int, cols: int) -> None:
        if not isinstance(w, QTensor) or w.shape != (rows, cols):
            raise ModelFormatError(f"{path}: {name} has shape {getattr(w, 'shape', None)} but the model needs "
                                   f"({rows}, {cols}); the file is inconsistent, convert it again")
        if w.data.shape != (rows, row_bytes(w.qtype, cols)):
            raise ModelFormatError(f"{path}: {name} holds {w.data.nbytes} bytes, not the "
                                   f"{rows * row_bytes(w.qtype, cols)} of its shape; the file is truncated or corrupt")

    matrix("the token embedding", weights.embed_tokens, args.vocab_size, D)
    matrix("the output head", weights.lm_head, args.vocab_size, D)
    vector("the final norm", weights.norm)
    if len(weights.layers) != args.num_hidden_layers:
        raise ModelFormatError(f"{path}: {len(weights.layers)} layers loaded of {args.num_hidden_layers}")
    for i, layer in enumerate(weights.layers):
        vector(f"layer {i} input_layernorm", layer.input_layernorm)
        vector(f"layer {i} post_attention_layernorm", layer.post_attention_layernorm)
        if args.kv_lora_rank:
            _check_latent_attention(layer, args, i, vector, matrix, path)
        else:
            matrix(f"layer {i} q_proj", layer.q_proj, q, D)
            matrix(f"layer {i} k_proj", layer.k_proj, kv, D)
            matrix(f"layer {i} v_proj", layer.v_proj, kv, D)
            matrix(f"layer {i} o_proj", layer.o_proj, D, q)
        if args.is_moe(i):
            matrix(f"layer {i} router", layer.gate, args.num_local_experts, D)
            if args.group_score == "top2":
                vector(f"layer {i} e_score_correction_bias", layer.extra.get("router_bias"), args.num_local_experts)
        else:
            F = args.dense_intermediate_size
            matrix(f"layer {i} mlp gate_proj", layer.mlp.gate, F, D)
            matrix(f"layer {i} mlp up_proj", layer.mlp.up, F, D)
            matrix(f"layer {i} mlp down_proj", layer.mlp.down, D, F)
        if args.qkv_bias:
            vector(f"layer {i} q_proj bias", layer.q_bias, q)
            vector(f"layer {i} k_proj bias", layer.k_bias, kv)
            vector(f"layer {i} v_proj bias", layer.v_bias, kv)
        if args.o_bias:
            vector(f"layer {i} o_proj bias", layer.o_bias)
        if args.qk_norm is not None:
            per_head = args.qk_norm == "head"
            vector(f"layer {i} q_norm", layer.q_norm, args.head_dim if per_head else q)
            vector(f"layer {i} k_norm", layer.k_norm, args.head_dim if per_head else kv)
        S = args.shared_expert_intermediate_size
        if S and args.is_moe(i):
            ex = layer.shared_expert
            matrix(f"layer {i} shared expert gate_proj", ex.gate, S, D)
            matrix(f"layer {i} shared expert up_proj", ex.up, S, D)
            matrix(f"layer {i} shared expert down_proj", ex.down, D, S)
            if layer.shared_expert_gate is not None or "shexp_router" in spec_of(args).layer_parts(args, i):
                matrix(f"layer {i} shared_expert_gate", layer.shared_expert_gate, 1, D)
    if experts is None:  # a streaming store: its extents were checked tensor by tensor (check_gguf_tensors)
        return
    layers = experts  # [layer][expert] → Expert
    if len(layers) != args.num_hidden_layers or \
            any(len(x) != (args.num_local_experts if args.is_moe(i) else 0) for i, x in enumerate(layers)):
        raise ModelFormatError(f"{path}: the experts do not match {args.num_hidden_layers} layers of "
                               f"{args.num_local_experts}; the file is inconsistent")
    I = args.intermediate_size
    for i, layer in enumerate(layers):
        for e, ex in enumerate(layer):
            matrix(f"layer {i} expert {e} gate", ex.gate, I, D)
            matrix(f"layer {i} expert {e} up", ex.up, I, D)
            matrix(f"layer {i} expert {e} down", ex.down, D, I)
