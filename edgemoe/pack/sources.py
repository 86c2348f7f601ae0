"""Plan a pack from a GGUF file or an HF checkpoint directory: which tensors, stored how, read from where.

Sources are read through the engine's own readers (memory-mapped, zero-copy), so a tensor is only
touched when its turn to be written comes. Tensors keep their stored type unless a type is asked
for; a GGUF's quantised tensors are then copied byte for byte. Q/K rows are in GGUF (interleaved RoPE)
order, as llama.cpp's converter and `gguf_export` write them, so the pack is an ordinary GGUF too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from ..errors import ModelFormatError, UnsupportedError, UsageError
from ..formats import names
from ..formats.gguf import expert_slices, open_gguf, scalar_metadata, to_qtensor
from ..formats.gguf_export import _FILE_TYPE, _add_metadata, _Hparams, _read_tokenizer, _storage_type
from ..formats.safetensors import read_config
from ..qtensor import QTensor
from .layout import ExpertJobs, PackPlan
from .manifest import PROJS
from .stream import TensorJob, converted_chunks, raw_chunks

Q = GGMLQuantizationType
_ROUTER = "ffn_gate_inp.weight"  # stays F32, as llama.cpp's converter keeps it
# Metadata a pack sets itself (or that belongs to the file, not the model) and does not copy.
_NOT_COPIED = ("GGUF.", "general.architecture", "general.alignment", "edgemoe.pack.", "split.")


def matrix_job(name: str, w: QTensor, want: GGMLQuantizationType | None,
               reorder: Callable[[np.ndarray], np.ndarray] | None = None) -> TensorJob:
    """A 2-D weight stored as `want` (None: as it is; F16 when its rows do not fill `want`'s blocks).

    reorder: a row permutation applied to the raw rows when the tensor is written (not before, so
    only one tensor's copy exists at a time)."""
    qt = w.qtype if want is None else _storage_type(want, w.cols)
    if reorder is None:
        return TensorJob(name, qt, (w.rows, w.cols), converted_chunks(w.data, w.qtype, w.cols, qt))

    def chunks() -> Iterator[np.ndarray]:
        rows = np.ascontiguousarray(reorder(w.data))  # (rows, row_bytes), whole rows moved
        yield from converted_chunks(rows, w.qtype, w.cols, qt)()

    return TensorJob(name, qt, (w.rows, w.cols), chunks)


def vector_job(name: str, v: np.ndarray) -> TensorJob:
    """A 1-D tensor (norm weights) as F32."""
    v = np.ascontiguousarray(v, dtype=np.float32)  # (D,)
    return TensorJob(name, Q.F32, v.shape, raw_chunks(v))


def _model_identity(name: Any, cfg: dict, architecture: str) -> dict:
    keys = ("num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {"name": str(name) if name else None, "architecture": architecture,
            **{k: int(cfg[k]) for k in keys if cfg.get(k) is not None}}


# ---------------------------------------------------------------------------------------------- GGUF

def plan_from_gguf(path: str, *, expert_type: GGMLQuantizationType | None = None,
                   dense_type: GGMLQuantizationType | None = None) -> PackPlan:
    """A pack of a MoE GGUF of any supported family (experts merged `*_exps` or one tensor per expert); metadata and
    tokenizer copied verbatim. Dense matrices are re-encoded only when `dense_type` is given (norms and
    the router stay as they are), experts only when `expert_type` is."""
    from ..loader import checked_gguf  # the loader's validation of every field and tensor

    reader = open_gguf(path)
    if "split.count" in reader.fields and int(scalar_metadata(reader).get("split.count", 1)) > 1:
        raise UnsupportedError(f"{path}: one shard of a split GGUF; merge the shards first "
                               "(llama-gguf-split --merge) and partition the merged file")
    meta, tensors, cfg = checked_gguf(reader, path)
    n_layers, n_experts = cfg["num_hidden_layers"], cfg["num_local_experts"]

    architecture = meta["general.architecture"]  # checked_gguf accepted it: a family of models/arch.py
    writer = GGUFWriter(None, architecture)
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED):
            continue
        if key == "general.file_type" and expert_type is not None and expert_type in _FILE_TYPE:
            writer.add_uint32(key, int(_FILE_TYPE[expert_type]))
            continue
        value = _field_value(key, field)
        if value is not None:
            writer.add_key_value(key, *value)

    experts, expert_tensors = [], set()
    dense_layers = cfg.get("dense_layers") or ()
    for i in range(n_layers):
        if i in dense_layers:  # its MLP is a dense tensor of the pack
            continue
        per_proj = {}
        for proj in PROJS:
            merged = names.GGUF_EXPERTS[proj].format(i=i)
            if merged in tensors:
                per_proj[proj] = expert_slices(tensors[merged])  # E × (out, in), zero-copy
                expert_tensors.add(merged)
                if len(per_proj[proj]) != n_experts:
                    raise ModelFormatError(f"{path}: {merged} holds {len(per_proj[proj])} experts but the metadata "
                                           f"says {n_experts}; the file is inconsistent, convert it again")
            else:
                split = [names.GGUF_EXPERT_SPLIT[proj].format(i=i, e=e) for e in range(n_experts)]
                missing = [n for n in split if n not in tensors]
                if missing:
                    raise ModelFormatError(f"{path}: tensor {merged} (or {missing[0]}) is missing; the file is "
                                           "incomplete or of another variant")
                per_proj[proj] = [to_qtensor(tensors[n]) for n in split]
                expert_tensors.update(split)
        for e in range(n_experts):
            jobs = {p: matrix_job(names.GGUF_EXPERT_SPLIT[p].format(i=i, e=e), per_proj[p][e], expert_type)
                    for p in PROJS}
            experts.append(ExpertJobs(i, e, jobs["gate"], jobs["up"], jobs["down"]))

    dense = [_gguf_dense_job(t, dense_type) for t in reader.tensors if t.name not in expert_tensors]
    return PackPlan(writer, dense, experts, os.path.abspath(path), "gguf",
                    _model_identity(meta.get("general.name"), cfg, architecture))


def _gguf_dense_job(t: Any, want: GGMLQuantizationType | None) -> TensorJob:
    """Copy a non-expert tensor as stored, or re-encode a 2-D matrix (not the router) as `want`."""
    if want is not None and len(t.shape) == 2 and not t.name.endswith(_ROUTER):
        return matrix_job(t.name, to_qtensor(t), want)
    qtype = Q(int(t.tensor_type))
    shape = tuple(int(n) for n in reversed(t.shape))  # numpy order
    return TensorJob(t.name, qtype, shape, raw_chunks(np.asarray(t.data).view(np.uint8)))


def _field_value(key: str, field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None] | None:
    """A GGUFReader field as GGUFWriter.add_key_value arguments, strings as raw bytes (copied verbatim).

    None for an empty array, which GGUFWriter cannot write."""
    vtype = field.types[0]
    if vtype != GGUFValueType.ARRAY:
        value = bytes(field.parts[-1]) if vtype == GGUFValueType.STRING else field.parts[-1].tolist()[0]
        return value, vtype, None
    if len(field.types) > 2:
        raise UnsupportedError(f"metadata key {key}: nested GGUF arrays are not supported")
    sub = field.types[1]
    if not field.data:
        return None
    if sub == GGUFValueType.STRING:
        return [bytes(field.parts[j]) for j in field.data], vtype, sub
    return [v for j in field.data for v in field.parts[j].tolist()], vtype, sub


# ----------------------------------------------------------------------------------------- safetensors

def plan_from_hf(path: str, *, expert_type: GGMLQuantizationType | None = None,
                 dense_type: GGMLQuantizationType | None = None, vocab_from: str | None = None) -> PackPlan:
    """A pack of an HF Mixtral checkpoint (either expert layout). Metadata as llama.cpp's converter writes it.

    Matrices keep the checkpoint's dtype (F32/F16/BF16) unless a type is asked for; norms and the router
    are F32. The tokenizer is not converted: `vocab_from` (a GGUF with this model's vocabulary) supplies
    the `tokenizer.*` keys, else the pack says `tokenizer.ggml.model = no_vocab`.
    """
    from ..loader import load_model  # validates the tensor set and shapes; zero-copy views of the files

    model = load_model(path, prepare=False).model  # validates the checkpoint of any supported family
    if model.args.model_type != "mixtral":
        raise UnsupportedError(f"{path}: packing an HF {model.spec.title} checkpoint directly is not supported; "
                               "convert it with llama.cpp's convert_hf_to_gguf.py and partition the GGUF")
    cfg = read_config(path)
    hp = _Hparams.from_config(cfg)
    tokenizer = None
    if vocab_from is not None:
        try:
            tokenizer = _read_tokenizer(vocab_from, hp.vocab)
        except ValueError as e:  # the token count differs from vocab_size
            raise UsageError(f"--vocab-from: {e}") from None
    w, E = model.weights, hp.experts

    writer = GGUFWriter(None, "llama")
    stored = model.experts.get(0, 0).gate.qtype
    _add_metadata(writer, hp, cfg, expert_type or stored)
    if tokenizer is None:
        writer.add_tokenizer_model("no_vocab")
    else:
        for key, (value, vtype, sub) in tokenizer.items():
            writer.add_key_value(key, value, vtype, sub)

    gg = {hf: g for g, hf in names.GGUF_TO_HF.items()}  # HF template → GGUF template

    def name(hf: str, i: int | None = None) -> str:
        return gg[hf].format(i=i)

    def qk_order(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda rows: names.permute_qk(rows, n_head)  # HF → GGUF (interleaved RoPE) row order

    dense = [matrix_job(name("model.embed_tokens.weight"), w.embed_tokens, dense_type)]
    for i, layer in enumerate(w.layers):
        p = "model.layers.{i}."
        router = QTensor.from_array(_dequant(layer.gate), Q.F32, layer.gate.rows, layer.gate.cols)
        dense += [
            vector_job(name(p + "input_layernorm.weight", i), layer.input_layernorm),
            matrix_job(name(p + "self_attn.q_proj.weight", i), layer.q_proj, dense_type, qk_order(hp.heads)),
            matrix_job(name(p + "self_attn.k_proj.weight", i), layer.k_proj, dense_type, qk_order(hp.kv_heads)),
            matrix_job(name(p + "self_attn.v_proj.weight", i), layer.v_proj, dense_type),
            matrix_job(name(p + "self_attn.o_proj.weight", i), layer.o_proj, dense_type),
            vector_job(name(p + "post_attention_layernorm.weight", i), layer.post_attention_layernorm),
            matrix_job(name(p + "mlp.gate.weight", i), router, None),
        ]
    dense.append(vector_job(name("model.norm.weight"), w.norm))
    if w.lm_head is not w.embed_tokens:
        dense.append(matrix_job(name("lm_head.weight"), w.lm_head, dense_type))

    experts = []
    for i in range(hp.layers):
        for e in range(E):
            x = model.experts.get(i, e)
            jobs = {p: matrix_job(names.GGUF_EXPERT_SPLIT[p].format(i=i, e=e), getattr(x, p), expert_type)
                    for p in PROJS}
            experts.append(ExpertJobs(i, e, jobs["gate"], jobs["up"], jobs["down"]))
    return PackPlan(writer, dense, experts, os.path.abspath(path), "safetensors",
                    _model_identity(cfg.get("_name_or_path"), cfg, "llama"))


def _dequant(w: QTensor) -> np.ndarray:
    from ..quants import dequantize_qtensor

    return np.ascontiguousarray(dequantize_qtensor(w), dtype=np.float32)  # (rows, cols); the router is small
