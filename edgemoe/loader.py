"""Model path → (ModelArgs, Model, Tokenizer). Dense weights stay memory-mapped; experts go to a store."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from .errors import ModelFormatError, UnsupportedError, UsageError
from .experts.store import Expert, ResidentExperts
from .formats import names
from .formats.gguf import expert_slices, is_gguf, open_gguf, scalar_metadata, tensor_index, to_qtensor
from .formats.safetensors import SafetensorsIndex, is_checkpoint_dir, read_config
from .memory import free_memory, machine_memory
from .models import arch
from .models.args import ModelArgs
from .models.moe import Layer, Model, Weights
from .qtensor import QTensor
from .validate import check_config, check_gguf_tensors, check_regular_file, check_weights

log = logging.getLogger(__name__)



@dataclass
class LoadedModel:
    args: ModelArgs
    model: Model
    tokenizer: Any  # edgemoe.tokenizer.Tokenizer, or None when the file carries no vocabulary
    path: str
    format: str  # "gguf" | "safetensors"
    metadata: dict | None = None  # a GGUF file's scalar metadata (its chat template, ...); None for HF directories


def load_model(path: str, stream=None, prepare: bool = True, *, repack: bool = True,
               progress: Callable[[str], None] = lambda what: None) -> LoadedModel:
    """Open a GGUF file or an HF checkpoint directory; raise a ModelFormatError/UnsupportedError otherwise.

    stream: `edgemoe.experts.setup.StreamOptions` to read experts from disk into a budgeted cache (GGUF only);
    None keeps every expert addressable through the memory map.
    prepare: lay the weights out for the kernels (Model.prepare); False keeps zero-copy views of the file
    (for tools that read the weights back). Dense tensors are copied out of the memory map when experts
    stream and three times their size is free (a copy changes no result).
    repack: weights of the types in `kernels.layouts.X8` take the 8-row interleaved layouts (config compute.repack); streamed
    experts are repacked as they arrive, memory-mapped ones when their copy fits in half of the machine's
    memory (memory.machine_memory): the layouts round differently, so the choice depends on the model, the
    config and the machine, never the free memory.
    progress: called with the name of each phase as it starts (edgemoe.progress.Phases shows the slow ones).
    """
    progress("reading the index and the vocabulary")
    loaded = _load(path, stream)
    if prepare:
        model = loaded.model
        own_dense = stream is not None and 3 * model.dense_nbytes() <= free_memory()
        experts = repack and (stream is not None or repack_resident(model.experts.nbytes))
        progress(f"laying out the weights (repacking {model.experts.nbytes / 2**20:,.0f} MB of experts)"
                 if experts and stream is None else "laying out the weights")
        model.prepare(own_dense, experts, repack_dense=repack)
    return loaded


def repack_resident(expert_bytes: int) -> bool:
    """Whether memory-mapped experts are copied into the interleaved layouts: when they fit in half of the
    machine's memory (a fixed figure, unlike the free memory)."""
    return 2 * expert_bytes <= machine_memory()


def _load(path: str, stream) -> LoadedModel:
    if not os.path.exists(path):
        raise ModelFormatError(f"{path}: no such file or directory; pass a .gguf file or an HF checkpoint directory")
    check_regular_file(path)
    if os.path.isdir(path):
        if not is_checkpoint_dir(path):
            raise ModelFormatError(f"{path}: directory has no config.json; pass an HF checkpoint directory or a .gguf file")
        if stream is not None:
            raise UsageError(f"{path}: expert streaming reads GGUF files; convert the checkpoint first with "
                             f"'edgemoe partition {path} -o model.gguf'")
        return _load_hf(path)
    if not is_gguf(path):
        raise ModelFormatError(f"{path}: neither a GGUF file nor an HF checkpoint directory; {arch.supported()} "
                               "are supported")
    return _load_gguf(path, stream)


def dequant_rows(w: QTensor):
    """ids (T,) → (T, cols) float32, dequantising only the rows asked for (embedding lookup)."""
    from .quants import dequantize

    def rows(ids: np.ndarray) -> np.ndarray:
        return dequantize(w.data[ids], w.qtype, w.cols).astype(np.float32, copy=False).reshape(len(ids), w.cols)

    return rows


# ---------------------------------------------------------------------------------------------- GGUF

def checked_gguf(reader, path: str) -> tuple[dict, dict, dict]:
    """(scalar metadata, tensor index, HF-named config) of an open GGUF file, every field and tensor checked
    (validate.py): what the loader and `edgemoe partition` trust."""
    meta = scalar_metadata(reader)
    tensors = tensor_index(reader)
    array_keys = {k for k, f in reader.fields.items() if f.types and f.types[0] == GGUFValueType.ARRAY}
    cfg = _gguf_config(meta, tensors, path, array_keys)
    check_gguf_tensors(tensors, ModelArgs.from_dict(cfg), path, os.path.getsize(path), int(reader.data_offset),
                       int(reader.alignment))
    return meta, tensors, cfg


def gguf_spec(meta: dict, path: str) -> arch.ArchSpec:
    """The family of a GGUF file, from general.architecture (arch `llama` only with experts: Mixtral)."""
    name = meta.get("general.architecture")
    if name is None:
        raise ModelFormatError(f"{path}: GGUF file has no general.architecture; it is not a model file")
    if not isinstance(name, str):
        raise ModelFormatError(f"{path}: general.architecture is not a string; the file is corrupt")
    spec = arch.by_gguf_arch(name)
    if spec is None or not meta.get(f"{name}.expert_count"):
        kind = f"{name[:40]} without experts (a dense model)" if spec is not None else name[:40]
        raise UnsupportedError(f"{path}: architecture {kind} is not supported; {arch.supported()}")
    return spec


def _gguf_config(meta: dict, tensors: dict, path: str, array_keys: set) -> dict:
    spec = gguf_spec(meta, path)
    a = spec.gguf_arch
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None) and spec.gguf_config is None:
        raise UnsupportedError(f"{path}: rope scaling {str(scaling)[:40]!r} is not supported; use a model without "
                               "context extension")
    keys = {**arch.GGUF_KEYS, **spec.gguf_keys}
    arrays = [k for k in (*(f"{a}.{k}" for k in (*keys, "rope.dimension_count", "rope.scaling.type")),
                          "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id") if k in array_keys]
    if arrays:
        raise ModelFormatError(f"{path}: metadata {arrays[0]} is an array where a single value belongs (per-layer "
                               "values are not supported); the file is corrupt or of an unsupported variant")
    cfg: dict[str, Any] = {"model_type": spec.model_type, **spec.gguf_fixed}
    for key, field in keys.items():
        if f"{a}.{key}" in meta:
            cfg[field] = meta[f"{a}.{key}"]
    if "vocab_size" not in cfg and "token_embd.weight" in tensors:
        cfg["vocab_size"] = int(tensors["token_embd.weight"].shape[1])
    cfg.setdefault("rope_theta", 10000.0)  # llama.cpp's default when the key is absent
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    cfg["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    # attention biases exist in some files of a family and not others: the tensors say
    cfg["qkv_bias"] = cfg.get("qkv_bias", False) or arch.GGUF_PARTS["q_bias"].format(i=0) in tensors
    cfg["o_bias"] = arch.GGUF_PARTS["o_bias"].format(i=0) in tensors
    if spec.gguf_config is not None:
        cfg = spec.gguf_config(cfg, meta, tensors, f"{path}: GGUF metadata")
    if not tensors:
        raise ModelFormatError(f"{path}: GGUF file has no tensors (a vocabulary-only file?); it can be used with "
                               "'edgemoe tokenize' but not to generate")
    cfg = check_config(cfg, f"{path}: GGUF metadata")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    return cfg


def _need(tensors: dict, name: str, path: str):
    if name not in tensors:
        raise ModelFormatError(f"{path}: tensor {name} is missing; the file is incomplete or of another variant")
    return tensors[name]


def _gguf_experts(tensors: dict, args: ModelArgs, path: str) -> list[list[Expert]]:
    layers = []
    for i in range(args.num_hidden_layers):
        if not args.is_moe(i):
            layers.append([])
            continue
        merged = names.GGUF_EXPERTS["gate"].format(i=i)
        if merged in tensors:
            parts = {p: expert_slices(_need(tensors, t.format(i=i), path)) for p, t in names.GGUF_EXPERTS.items()}
        else:
            parts = {p: [to_qtensor(_need(tensors, t.format(i=i, e=e), path)) for e in range(args.num_local_experts)]
                     for p, t in names.GGUF_EXPERT_SPLIT.items()}
        layers.append([Expert(parts["gate"][e], parts["up"][e], parts["down"][e])
                       for e in range(args.num_local_experts)])
    return layers


VECTORS = {"attn_norm", "ffn_norm", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm", "q_a_norm",
           "kv_a_norm", "router_bias", "sinks", "router_b"}  # 1-D parts
COMMON = {"attn_norm", "q", "k", "v", "o", "ffn_norm", "router", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm",
          "k_norm", "shexp_gate", "shexp_up", "shexp_down", "shexp_router", "mlp_gate", "mlp_up", "mlp_down"}


def build_layer(t: dict, spec=None, args=None) -> Layer:
    """A Layer from its tensors by part name (models/arch.py HF_PARTS / GGUF_PARTS); optional parts may be absent."""
    shared = None
    if "shexp_gate" in t:
        shared = Expert(t["shexp_gate"], t["shexp_up"], t["shexp_down"])
    gate = t.get("shexp_router")
    if isinstance(gate, np.ndarray):  # GGUF stores the shared expert's gate as a vector (D,)
        vec = np.ascontiguousarray(gate, dtype=np.float32).reshape(1, -1)  # (1, D)
        gate = QTensor.from_array(vec, GGMLQuantizationType.F32, 1, vec.shape[1])
    mlp = Expert(t["mlp_gate"], t["mlp_up"], t["mlp_down"]) if "mlp_gate" in t else None
    extra = {p: w for p, w in t.items() if p not in COMMON}  # the family's own tensors
    if spec is not None and spec.finish_layer is not None:
        extra = spec.finish_layer(extra, args)
    return Layer(input_layernorm=t["attn_norm"], q_proj=t.get("q"), k_proj=t.get("k"), v_proj=t.get("v"),
                 o_proj=t["o"], post_attention_layernorm=t["ffn_norm"], gate=t.get("router"), q_bias=t.get("q_bias"),
                 k_bias=t.get("k_bias"), v_bias=t.get("v_bias"), o_bias=t.get("o_bias"), q_norm=t.get("q_norm"),
                 k_norm=t.get("k_norm"), shared_expert=shared, shared_expert_gate=gate, mlp=mlp, extra=extra)


def _unpermuted(w: QTensor, n_head: int) -> QTensor:
    data = np.ascontiguousarray(names.unpermute_qk(w.data, n_head))  # whole rows move; blocks stay intact
    return QTensor(data, w.qtype, w.rows, w.cols)


def _load_gguf(path: str, stream=None) -> LoadedModel:
    reader = open_gguf(path)
    meta, tensors, cfg = checked_gguf(reader, path)
    args = ModelArgs.from_dict(cfg)
    rope_dim = meta.get(f"{gguf_spec(meta, path).gguf_arch}.rope.dimension_count", args.head_dim)
    if rope_dim != args.head_dim:
        raise UnsupportedError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
                               f"{args.head_dim}) are not supported")

    def get(template: str, i: int | None = None):
        return to_qtensor(_need(tensors, template.format(i=i), path))

    spec = arch.spec_of(args)
    layers = []
    for i in range(args.num_hidden_layers):
        t = {}
        for p in spec.layer_parts(args, i):
            if p == "kv_b" and spec.gguf_name("k_b").format(i=i) in tensors:  # current files split it, per head
                for half in ("k_b", "v_b"):
                    t[half] = expert_slices(_need(tensors, spec.gguf_name(half).format(i=i), path))
                continue
            t[p] = get(spec.gguf_name(p), i)  # 1-D tensors come as float32 arrays
        if spec.permute_qk:
            t["q"], t["k"] = _unpermuted(t["q"], args.num_attention_heads), _unpermuted(t["k"], args.num_key_value_heads)
        layers.append(build_layer(t, spec, args))
    embed = get("token_embd.weight")
    if "output.weight" in tensors:
        lm_head = get("output.weight")
    else:
        lm_head = embed
        log.warning("%s: no output.weight; the output head is the token embedding (tied), as llama.cpp does", path)
    weights = Weights(embed_tokens=embed, layers=layers, norm=get("output_norm.weight"), lm_head=lm_head)
    resident = _gguf_experts(tensors, args, path) if stream is None else None
    check_weights(weights, resident, args, path)

    tokenizer = None
    vocab_model = meta.get("tokenizer.ggml.model", "no_vocab")
    if vocab_model not in ("no_vocab", "none"):  # llama.cpp's markers for a model file without a vocabulary
        from .tokenizer import Tokenizer

        tokenizer = _vocabulary(lambda: Tokenizer.from_gguf_reader(reader), path)
        if tokenizer.vocab_size != args.vocab_size:  # llama.cpp refuses this too
            raise ModelFormatError(f"{path}: the vocabulary has {tokenizer.vocab_size} tokens but the embedding "
                                   f"{args.vocab_size} rows; the file is inconsistent, convert it again")
    if resident is not None:
        experts = ResidentExperts(resident)
    else:
        from .experts.setup import streaming_store

        experts = streaming_store(path, tensors, args, stream)
    model = Model(args, weights, experts, dequant_rows(embed))
    return LoadedModel(args, model, tokenizer, path, "gguf", meta)


def _vocabulary(build, path: str):
    """A tokenizer from the file's own vocabulary; malformed vocabulary metadata is a format error."""
    from .errors import EdgeMoEError

    try:
        return build()
    except EdgeMoEError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        raise ModelFormatError(f"{path}: the vocabulary is malformed ({type(e).__name__}: {str(e)[:80]}); "
                               "convert the model again") from None


# ----------------------------------------------------------------------------------------- safetensors

def _load_hf(path: str) -> LoadedModel:
    cfg = read_config(path)
    spec = arch.by_model_type(cfg.get("model_type"))
    if spec is None:
        raise UnsupportedError(f"{path}: model_type {str(cfg.get('model_type'))[:40]!r} is not supported; "
                               f"{arch.supported()}")
    cfg = check_config(spec.hf_config(cfg, f"{path}/config.json"), f"{path}/config.json")
    if cfg.get("num_key_value_heads") is None:  # the families' configs default to one KV head per query head
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    args = ModelArgs.from_dict(cfg)
    idx = SafetensorsIndex(path)
    _check_hf_names(idx, args, spec, path)

    def need(name: str) -> str:
        if name not in idx:
            raise ModelFormatError(f"{path}: tensor {name} is missing from the checkpoint; re-save it")
        return name

    def tensor(part: str, i: int):
        if part == "router":  # older checkpoints name it otherwise (Mixtral's block_sparse_moe.gate)
            old = next((t.format(i=i) for t in spec.hf_router_aliases if t.format(i=i) in idx), None)
            if old is not None:
                return idx.matrix(old)
        name = need(spec.hf_name(part).format(i=i))
        return idx.vector(name) if part in VECTORS else idx.matrix(name)

    layers, experts = [], []
    for i in range(args.num_hidden_layers):
        layers.append(build_layer({p: tensor(p, i) for p in spec.layer_parts(args, i, "hf")}, spec, args))
        if not args.is_moe(i):
            experts.append([])
        elif spec.hf_experts is not None:
            experts.append(spec.hf_experts(idx, args, i, need))
        else:
            experts.append(_hf_layer_experts(idx, args, spec, i, need))
    embed = idx.matrix(need("model.embed_tokens.weight"))
    lm_head = embed if args.tie_word_embeddings else idx.matrix(need("lm_head.weight"))
    weights = Weights(embed_tokens=embed, layers=layers, norm=idx.vector(need("model.norm.weight")), lm_head=lm_head)
    check_weights(weights, experts, args, path)
    model = Model(args, weights, ResidentExperts(experts), dequant_rows(embed))

    tokenizer = None
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        from .tokenizer import load_tokenizer

        tokenizer = _vocabulary(lambda: load_tokenizer(path), path)
        if tokenizer.vocab_size > args.vocab_size:
            raise ModelFormatError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding "
                                   f"{args.vocab_size} rows; the checkpoint is inconsistent")
    return LoadedModel(args, model, tokenizer, path, "safetensors")


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _check_hf_names(idx: SafetensorsIndex, args: ModelArgs, spec, path: str) -> None:
    """No tensor of a layer beyond num_hidden_layers, and none the model would leave unread."""
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(args.num_hidden_layers):
        known |= {spec.hf_name(p).format(i=i) for p in spec.layer_parts(args, i, "hf")}
        if not args.is_moe(i):
            continue
        known |= {t.format(i=i) for t in spec.hf_router_aliases}
        known |= {t.format(i=i) for t in names.HF_EXPERT_FUSED.values()}
        known |= {t.format(i=i) for t in spec.hf_expert_tensors}
        known |= {t.format(i=i, e=e) for t in spec.hf_expert_split.values() for e in range(args.num_local_experts)}
    for name in idx.keys():
        m = _HF_LAYER.match(name)
        if m and int(m.group(1)) >= args.num_hidden_layers:
            raise ModelFormatError(f"{path}: tensor {name} belongs to layer {m.group(1)} but config.json says "
                                   f"{args.num_hidden_layers} layers (num_hidden_layers); the checkpoint is inconsistent")
        if name not in known and not name.endswith("rotary_emb.inv_freq"):
            raise UnsupportedError(f"{path}: tensor {name[:80]} is not part of a {spec.title} model; the checkpoint "
                                   "is for another architecture or variant")


def _hf_layer_experts(idx: SafetensorsIndex, args: ModelArgs, spec, i: int, need) -> list[Expert]:
    fused = names.HF_EXPERT_FUSED["gate_up"].format(i=i)
    if fused in idx:
        gate_up = idx.matrices(fused)  # E × (2I, D)
        down = idx.matrices(need(names.HF_EXPERT_FUSED["down"].format(i=i)))  # E × (D, I)
        inter = args.intermediate_size
        out = []
        for e in range(args.num_local_experts):
            gu = gate_up[e]
            gate = QTensor(gu.data[:inter], gu.qtype, inter, gu.cols)
            up = QTensor(gu.data[inter:], gu.qtype, inter, gu.cols)
            out.append(Expert(gate, up, down[e]))
        return out
    t = spec.hf_expert_split
    return [Expert(idx.matrix(need(t["gate"].format(i=i, e=e))), idx.matrix(need(t["up"].format(i=i, e=e))),
                   idx.matrix(need(t["down"].format(i=i, e=e)))) for e in range(args.num_local_experts)]
