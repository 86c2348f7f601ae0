"""Write a Mixtral checkpoint (HF names, float32 arrays) as a GGUF file, the way llama.cpp's converter does.

Mirrors `convert_hf_to_gguf.py` (`LlamaModel` for `MixtralForCausalLM`): arch `llama`, Q/K rows permuted
for interleaved RoPE, experts merged into 3-D `ffn_{gate,up,down}_exps` tensors, norms and the router kept
F32. Tensors are quantised and written one at a time, so memory stays at about one tensor.

Shapes: V = vocab, D = hidden, I = expert intermediate, E = experts, H / KV = query / key-value heads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from ..errors import ModelFormatError, UnsupportedError, UsageError
from ..models.mixtral import SPEC as MIXTRAL
from ..qtensor import FORMATS
from ..quants import QUANTIZE, quantize
from .names import (
    GGUF_EXPERT_SPLIT,
    GGUF_EXPERTS,
    GGUF_TO_HF,
    HF_EXPERT_FUSED,
    permute_qk,
)

Q = GGMLQuantizationType
# Types this exporter writes: those edgemoe has a quantiser for (quants.QUANTIZE).
EXPORT_TYPES = tuple(t.name for t in QUANTIZE)
# general.file_type names the type of the bulk of the weights (the experts). Pure Q4_K is closest to
# llama-quantize's Q4_K_S recipe.
_FILE_TYPE = {
    Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    Q.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE,
}
# HF tensors the converter drops.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_TOKENIZER_PREFIX = "tokenizer."


@dataclass(frozen=True)
class _Job:
    """One GGUF tensor to write: its name, storage type, logical numpy shape and how to make its data."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, e.g. (E, out, in)
    make: Callable[[], np.ndarray]  # → float32 array of `shape`


def export_mixtral_gguf(
    path: str | os.PathLike,
    config: dict,
    tensors: Mapping[str, np.ndarray],
    *,
    qtype: str | GGMLQuantizationType = "F32",
    expert_qtype: str | GGMLQuantizationType | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    merged_experts: bool = True,
) -> None:
    """Write a MixtralForCausalLM as a GGUF file at `path` (via `path + ".tmp"`, then rename).

    config: the HF `config.json` dict. tensors: HF name → float32 array, experts either per expert
    (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`) or fused (`mlp.experts.gate_up_proj` / `down_proj`).
    qtype: storage of the 2-D attention/embedding/output matrices; expert_qtype: of the expert matrices
    (default: qtype). Norms and the router stay F32; a matrix whose rows do not fill whole blocks falls
    back to F16, as llama.cpp's converter does. tokenizer_from: a GGUF file whose `tokenizer.*` keys are
    copied verbatim; None writes `tokenizer.ggml.model = "no_vocab"`, which llama.cpp loads without a
    vocabulary. merged_experts=False writes one tensor per expert (`blk.{i}.ffn_gate.{e}.weight`), the
    layout of older Mixtral GGUF files.
    """
    dense_type = _parse_qtype(qtype, "qtype")
    expert_type = dense_type if expert_qtype is None else _parse_qtype(expert_qtype, "expert_qtype")
    hp = _Hparams.from_config(config)
    tokenizer = _read_tokenizer(tokenizer_from, hp.vocab) if tokenizer_from is not None else None
    jobs = list(_jobs(hp, tensors, dense_type, expert_type, merged_experts))

    path = os.fspath(path)
    tmp = path + ".tmp"
    writer = GGUFWriter(None, "llama")
    _add_metadata(writer, hp, config, expert_type)
    if tokenizer is None:
        writer.add_tokenizer_model("no_vocab")
    else:
        for key, (value, vtype, sub_type) in tokenizer.items():
            writer.add_key_value(key, value, vtype, sub_type)
    for job in jobs:
        n_rows = int(np.prod(job.shape[:-1]))
        byte_shape = (*job.shape[:-1], _row_bytes(job.qtype, job.shape[-1]))
        writer.add_tensor_info(job.name, byte_shape, np.dtype(np.uint8), n_rows * byte_shape[-1],
                               raw_dtype=job.qtype)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for job in jobs:
            x = job.make()
            assert x.shape == job.shape, (job.name, x.shape, job.shape)
            writer.write_tensor_data(quantize(x, job.qtype))  # (..., row_bytes) uint8
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass(frozen=True)
class _Hparams:
    layers: int
    hidden: int  # D
    intermediate: int  # I
    heads: int  # H
    kv_heads: int  # KV
    head_dim: int
    head_dim_given: bool  # config has a non-null head_dim (the converter then writes key/value_length)
    experts: int  # E
    top_k: int
    vocab: int  # V
    eps: float
    context: int | None
    rope_theta: float | None
    tied: bool

    @staticmethod
    def from_config(c: dict) -> _Hparams:
        arch = (c.get("architectures") or ["MixtralForCausalLM"])[0]
        if arch != "MixtralForCausalLM":
            raise UnsupportedError(f"export_mixtral_gguf got a {arch} config; only MixtralForCausalLM is supported")
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "num_local_experts", "num_experts_per_tok", "vocab_size", "rms_norm_eps")
                   if c.get(k) is None]
        if missing:
            raise ModelFormatError(f"config.json lacks {', '.join(missing)}; pass a full MixtralForCausalLM config")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            raise UnsupportedError(f"rope_type {rope_type!r} is not supported for Mixtral export; use default RoPE")
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim")
        return _Hparams(
            layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
            heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim if head_dim is not None else c["hidden_size"] // heads,
            head_dim_given=head_dim is not None, experts=c["num_local_experts"], top_k=c["num_experts_per_tok"],
            vocab=c["vocab_size"], eps=c["rms_norm_eps"], context=c.get("max_position_embeddings"),
            rope_theta=rope.get("rope_theta", c.get("rope_theta")), tied=bool(c.get("tie_word_embeddings", False)),
        )


def _add_metadata(w: GGUFWriter, hp: _Hparams, config: dict, expert_type: GGMLQuantizationType) -> None:
    """The keys convert_hf_to_gguf.py writes for a Mixtral (TextModel + LlamaModel.set_gguf_parameters)."""
    w.add_type("model")
    w.add_name(str(config.get("_name_or_path") or "Mixtral"))
    w.add_block_count(hp.layers)
    if hp.context is not None:
        w.add_context_length(hp.context)
    w.add_embedding_length(hp.hidden)
    w.add_feed_forward_length(hp.intermediate)
    w.add_head_count(hp.heads)
    w.add_head_count_kv(hp.kv_heads)
    if hp.rope_theta is not None:
        w.add_rope_freq_base(float(hp.rope_theta))
    w.add_layer_norm_rms_eps(float(hp.eps))
    w.add_expert_count(hp.experts)
    w.add_expert_used_count(hp.top_k)
    if hp.head_dim_given:  # as the converter: written whenever config.json has a head_dim
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_file_type(_FILE_TYPE[expert_type])
    w.add_vocab_size(hp.vocab)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_quantization_version(GGML_QUANT_VERSION)


def _jobs(hp: _Hparams, tensors: Mapping[str, np.ndarray], dense: GGMLQuantizationType,
          expert: GGMLQuantizationType, merged: bool) -> Iterator[_Job]:
    """Every GGUF tensor in file order, after checking the HF tensor set and shapes."""
    used: set[str] = set()
    hf_of = {v: k for k, v in GGUF_TO_HF.items()}  # HF template → GGUF template
    D, I, E, V = hp.hidden, hp.intermediate, hp.experts, hp.vocab
    q_rows, kv_rows = hp.heads * hp.head_dim, hp.kv_heads * hp.head_dim

    def get(name: str, shape: tuple[int, ...], *aliases: str) -> np.ndarray:
        for n in (name, *aliases):
            if n in tensors:
                used.add(n)
                a = tensors[n]
                if tuple(a.shape) != shape:
                    raise ModelFormatError(f"{n} has shape {tuple(a.shape)}, config.json implies {shape}")
                return a
        raise ModelFormatError(f"checkpoint lacks {name}; pass every tensor of the MixtralForCausalLM")

    def job(hf: str, shape: tuple[int, ...], kind: str, i: int | None = None, aliases: tuple[str, ...] = (),
            fix: Callable[[np.ndarray], np.ndarray] | None = None) -> _Job:
        name = hf_of[hf].format(i=i)
        full, alias_names = hf.format(i=i), tuple(a.format(i=i) for a in aliases)
        a = get(full, shape, *alias_names)
        qt = Q.F32 if kind == "f32" else _storage_type(dense, shape[-1])
        return _Job(name, qt, shape, lambda: _f32(fix(a) if fix else a))

    yield job("model.embed_tokens.weight", (V, D), "dense")
    for i in range(hp.layers):
        pre = "model.layers.{i}."
        yield job(pre + "input_layernorm.weight", (D,), "f32", i)
        yield job(pre + "self_attn.q_proj.weight", (q_rows, D), "dense", i,
                  fix=lambda w: permute_qk(np.asarray(w), hp.heads))
        yield job(pre + "self_attn.k_proj.weight", (kv_rows, D), "dense", i,
                  fix=lambda w: permute_qk(np.asarray(w), hp.kv_heads))
        yield job(pre + "self_attn.v_proj.weight", (kv_rows, D), "dense", i)
        yield job(pre + "self_attn.o_proj.weight", (D, q_rows), "dense", i)
        yield job(pre + "post_attention_layernorm.weight", (D,), "f32", i)
        yield job(pre + "mlp.gate.weight", (E, D), "f32", i, aliases=(pre + "block_sparse_moe.gate.weight",))
        experts = _layer_experts(i, hp, tensors, get)  # proj → list of E thunks of (out, in)
        for proj in ("gate", "down", "up"):  # the converter's order: w1, w2, w3
            out_in = (D, I) if proj == "down" else (I, D)
            qt = _storage_type(expert, out_in[1])
            if merged:
                yield _Job(GGUF_EXPERTS[proj].format(i=i), qt, (E, *out_in),
                           lambda fs=experts[proj]: np.stack([_f32(f()) for f in fs]))  # (E, out, in)
            else:
                for e in range(E):
                    yield _Job(GGUF_EXPERT_SPLIT[proj].format(i=i, e=e), qt, out_in,
                               lambda f=experts[proj][e]: _f32(f()))
    yield job("model.norm.weight", (D,), "f32")
    if "lm_head.weight" in tensors:
        head = get("lm_head.weight", (V, D))
        if not hp.tied:
            yield _Job("output.weight", _storage_type(dense, D), (V, D), lambda: _f32(head))

    unknown = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        raise ModelFormatError(f"unexpected tensors for a MixtralForCausalLM: {', '.join(unknown[:5])}"
                               f"{' …' if len(unknown) > 5 else ''}; pass only the model's own weights")


def _layer_experts(i: int, hp: _Hparams, tensors: Mapping[str, np.ndarray],
                   get: Callable[..., np.ndarray]) -> dict[str, list[Callable[[], np.ndarray]]]:
    """proj → E thunks giving that expert's (out, in) matrix, from either HF expert layout."""
    D, I, E = hp.hidden, hp.intermediate, hp.experts
    gate_up_name = HF_EXPERT_FUSED["gate_up"].format(i=i)
    if gate_up_name in tensors:
        gate_up = get(gate_up_name, (E, 2 * I, D))  # (E, 2I, D) = [gate; up]
        down = get(HF_EXPERT_FUSED["down"].format(i=i), (E, D, I))  # (E, D, I)
        return {"gate": [lambda e=e: gate_up[e, :I] for e in range(E)],
                "up": [lambda e=e: gate_up[e, I:] for e in range(E)],
                "down": [lambda e=e: down[e] for e in range(E)]}
    out: dict[str, list[Callable[[], np.ndarray]]] = {}
    for proj, template in MIXTRAL.hf_expert_split.items():  # HF's per-expert names (w1/w3/w2)
        shape = (D, I) if proj == "down" else (I, D)
        arrays = [get(template.format(i=i, e=e), shape) for e in range(E)]
        out[proj] = [lambda a=a: a for a in arrays]
    return out


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _parse_qtype(q: str | GGMLQuantizationType, what: str) -> GGMLQuantizationType:
    name = q.name if isinstance(q, GGMLQuantizationType) else str(q).upper()
    if name in EXPORT_TYPES:
        return Q[name]
    if name in Q.__members__ and Q[name] in FORMATS:
        raise UnsupportedError(f"{what}={name}: edgemoe has no {name} quantiser; export as one of "
                               f"{', '.join(EXPORT_TYPES)}, or re-quantise an F16 export with llama-quantize")
    raise UsageError(f"{what}={q!r} is not an export type; use one of {', '.join(EXPORT_TYPES)}")


def _storage_type(qtype: GGMLQuantizationType, n_cols: int) -> GGMLQuantizationType:
    """`qtype`, or F16 when a row of `n_cols` does not fill whole blocks (the converter's fallback)."""
    return qtype if n_cols % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def _row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_cols // block * size


def _read_tokenizer(path: str | os.PathLike, vocab: int) -> dict[str, tuple[object, GGUFValueType, object]]:
    """Every `tokenizer.*` key of a GGUF file as (value, type, array item type), strings as raw bytes."""
    try:
        keys = _read_kv(os.fspath(path), _TOKENIZER_PREFIX)
    except (OSError, ValueError, struct.error) as e:
        raise ModelFormatError(f"cannot read tokenizer GGUF {os.fspath(path)}: {e}") from e
    tokens = keys.get("tokenizer.ggml.tokens")
    if "tokenizer.ggml.model" not in keys or tokens is None:
        raise ModelFormatError(f"{os.fspath(path)} has no tokenizer.ggml.model/tokens; pass a GGUF with a vocabulary")
    if len(tokens[0]) != vocab:
        raise ValueError(f"{os.fspath(path)} has {len(tokens[0])} tokens but the model's vocab_size is {vocab}; "
                         "pass the tokenizer of this model")
    return keys


# GGUF scalar value types → struct format (little-endian).
_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


def _read_kv(path: str, prefix: str) -> dict[str, tuple[object, GGUFValueType, object]]:
    """The metadata keys starting with `prefix` of a little-endian GGUF v2/v3 file.

    A direct parse: gguf.GGUFReader spends ~5 s building a NumPy view per string of a 32k vocabulary.
    """
    with open(path, "rb") as f:
        head = f.read(24)
        magic, version, _n_tensors, n_kv = struct.unpack("<4sIQQ", head)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        buf = f.read()  # metadata comes first; vocab-only files are a few MB
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    def string() -> bytes:
        nonlocal pos
        (n,) = take("Q")
        pos += n
        return bytes(buf[pos - n : pos])

    def scalar(t: GGUFValueType) -> object:
        return string() if t == GGUFValueType.STRING else take(_SCALAR[t])[0]

    out: dict[str, tuple[object, GGUFValueType, object]] = {}
    for _ in range(n_kv):
        key = string().decode("utf-8")
        vtype = GGUFValueType(take("I")[0])
        if vtype == GGUFValueType.ARRAY:
            sub, n = GGUFValueType(take("I")[0]), take("Q")[0]
            if sub == GGUFValueType.ARRAY:
                raise ValueError(f"{key}: nested arrays are not supported")
            if sub == GGUFValueType.STRING:
                value: object = [string() for _ in range(n)]
            else:
                value = list(take(f"{n}{_SCALAR[sub]}"))
            if key.startswith(prefix):
                out[key] = (value, vtype, sub)
        else:
            value = scalar(vtype)
            if key.startswith(prefix):
                out[key] = (value, vtype, None)
    return out
