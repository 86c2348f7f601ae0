"""The architecture registry: GGUF `general.architecture` / HF `model_type` → the family's spec.

A spec owns what differs between MoE families: how its config keys and GGUF metadata become ModelArgs
(refusing what it cannot honour), its tensor names in both formats, whether the llama converter permuted
its Q/K rows, how its attention inputs are formed (biases, q/k norms, clipping) and what its MoE block adds
besides the routed experts (a shared expert). The variants' arithmetic (q/k norms, clamps, biases) is
written once, in the kernels both decode paths share (kernels/ops.qk_inputs, kernels/fused.py); a family
names which it has through the ModelArgs its spec builds. Each family is one file (models/<model_type>.py) that
builds one ArchSpec; the loader, the packer and the forward pass ask the spec and know no family's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFormatError, UnsupportedError

# Per-layer tensors every family names the same way unless its spec overrides them (HF, then GGUF).
HF_PARTS = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "o_bias": "model.layers.{i}.self_attn.o_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "router": "model.layers.{i}.mlp.gate.weight",
    "shexp_gate": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "shexp_up": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "shexp_down": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "shexp_router": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "mlp_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "mlp_up": "model.layers.{i}.mlp.up_proj.weight",
    "mlp_down": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_PARTS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "o_bias": "blk.{i}.attn_output.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "router": "blk.{i}.ffn_gate_inp.weight",
    "shexp_gate": "blk.{i}.ffn_gate_shexp.weight",
    "shexp_up": "blk.{i}.ffn_up_shexp.weight",
    "shexp_down": "blk.{i}.ffn_down_shexp.weight",
    "shexp_router": "blk.{i}.ffn_gate_inp_shexp.weight",
    "mlp_gate": "blk.{i}.ffn_gate.weight",
    "mlp_up": "blk.{i}.ffn_up.weight",
    "mlp_down": "blk.{i}.ffn_down.weight",
}
# Experts, per projection: HF per-expert tensors, as save_pretrained writes them (the fused 3-D layout and
# the GGUF names are the same for every family: formats/names.py).
HF_EXPERT_SPLIT = {"gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                   "up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                   "down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight"}

# GGUF metadata key (after the "{arch}." prefix) → ModelArgs field, shared by every family.
GGUF_KEYS = {
    "vocab_size": "vocab_size",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok",
}


@dataclass(frozen=True)
class ArchSpec:
    """What one MoE family is; built once by its file (models/<model_type>.py)."""

    model_type: str  # HF config.json model_type
    gguf_arch: str  # GGUF general.architecture
    title: str  # for messages and the doctor: "Qwen3-MoE"
    hf_config: Callable[[dict, str], dict]  # config.json → ModelArgs fields (raises UnsupportedError)
    gguf_keys: dict[str, str]  # this family's GGUF keys (after "{arch}.") → ModelArgs fields, besides GGUF_KEYS
    gguf_fixed: dict[str, Any] = field(default_factory=dict)  # what llama.cpp's graph for the arch hard-codes
    permute_qk: bool = False  # llama.cpp's converter permuted the Q/K rows (interleaved RoPE): undo on load
    hf_parts: dict[str, str] = field(default_factory=dict)  # overrides of (and additions to) HF_PARTS
    gguf_parts: dict[str, str] = field(default_factory=dict)  # the same for GGUF_PARTS
    hf_router_aliases: tuple[str, ...] = ()  # older names of the router tensor
    hf_expert_split: dict[str, str] = field(default_factory=lambda: dict(HF_EXPERT_SPLIT))
    hf_ignored: tuple[str, ...] = ()  # suffixes of checkpoint tensors the model does not use
    fused_attention: bool = True  # the one-sequence fused attention blocks compute this family's attention
    sinks_window: Callable | None = None  # (layer, i, args) → layer i's attention sinks (H,) or None, its window
    shared_gate: bool = True  # a shared expert's output is scaled by sigmoid(shared_expert_gate · h) (Qwen2-MoE)
    # A family whose attention is not grouped-query attention over q/k/v projections (DeepSeek's MLA) brings
    # its own: the tensors it reads, the block, its rotary tables, its KV cache, its softmax scale and how
    # its loaded tensors become the block's weights.
    attention_parts: Callable | None = None  # args → per-layer attention parts (default q, k, v, o + extras)
    attention: Callable | None = None  # (model, x, layer, i, seqs, cos, sin) → (T, D)
    rope_tables: Callable | None = None  # (args, positions) → cos, sin
    new_cache: Callable | None = None  # (args, n_ctx, cache_type) → a KV cache
    softmax_scale: Callable | None = None  # args → the attention's scale (default 1/sqrt(head_dim))
    finish_layer: Callable | None = None  # (the family's tensors by part, args) → what its blocks read
    moe_parts: Callable | None = None  # (args, "hf" | "gguf") → a MoE layer's further tensors (expert biases)
    hf_experts: Callable | None = None  # (index, args, i, need) → a layer's experts, when not the usual layouts
    hf_expert_tensors: tuple[str, ...] = ()  # further per-layer tensors ("...{i}...") hf_experts may read
    expert_fn: Callable | None = None  # (x, expert, layer, e, args) → (n, D): an expert not plain SwiGLU
    moe_extras: Callable | None = None  # (layer, args) → expert biases and SwiGLU clamp for the fused blocks
    route: Callable | None = None  # (model, x, layer) → ids, weights (default softmax → top-k)
    gguf_config: Callable | None = None  # (cfg, meta, tensors, where) → cfg: what the key table cannot say

    def hf_name(self, part: str) -> str:
        return self.hf_parts.get(part, HF_PARTS.get(part))

    def gguf_name(self, part: str) -> str:
        return self.gguf_parts.get(part, GGUF_PARTS.get(part))

    def layer_parts(self, args, i: int, fmt: str = "gguf") -> tuple[str, ...]:
        """The tensors (besides experts) layer i of a model of this family with these args has, in a GGUF file
        or (fmt "hf") an HF checkpoint."""
        if self.attention_parts is not None:
            attention = list(self.attention_parts(args))
        else:
            attention = ["q", "k", "v", "o", *self.attention_extras(args)]
        parts = ["attn_norm", *attention, "ffn_norm"]
        if not args.is_moe(i):
            return (*parts, "mlp_gate", "mlp_up", "mlp_down")
        parts.append("router")
        if args.group_score == "top2":  # DeepSeek-V3's selection bias
            parts.append("router_bias")
        if args.shared_expert_intermediate_size:
            parts += ["shexp_gate", "shexp_up", "shexp_down"] + (["shexp_router"] if self.shared_gate else [])
        if self.moe_parts is not None:
            parts += self.moe_parts(args, fmt)
        return tuple(parts)

    def attention_extras(self, args) -> list[str]:
        parts = []
        if args.qkv_bias:
            parts += ["q_bias", "k_bias", "v_bias"]
        if args.o_bias:
            parts.append("o_bias")
        if args.qk_norm is not None:
            parts += ["q_norm", "k_norm"]
        return parts


_REGISTRY: dict[str, ArchSpec] = {}


def _families() -> dict[str, ArchSpec]:
    if not _REGISTRY:  # imported on first use: no import-time side effects in the package
        from . import deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe

        for spec in (mixtral.SPEC, qwen3_moe.SPEC, qwen2_moe.SPEC, olmoe.SPEC, deepseek_v2.SPEC, deepseek_v3.SPEC,
                     gpt_oss.SPEC):
            _REGISTRY[spec.model_type] = spec
    return _REGISTRY


def supported() -> str:
    """One line naming what loads, for error messages."""
    return "MoE models of the families " + ", ".join(f"{s.title} (HF {s.model_type}, GGUF {s.gguf_arch})"
                                                    for s in _families().values())


def by_model_type(model_type) -> ArchSpec | None:
    return _families().get(model_type) if isinstance(model_type, str) else None


def by_gguf_arch(arch: str) -> ArchSpec | None:
    return next((s for s in _families().values() if s.gguf_arch == arch), None)


def spec_of(args) -> ArchSpec:
    spec = by_model_type(args.model_type)
    if spec is None:
        raise UnsupportedError(f"model_type {str(args.model_type)[:40]!r} is not supported; {supported()}")
    return spec


# ------------------------------------------------------------------ config helpers the families share

def refuse_rope_scaling(cfg: dict, where: str) -> None:
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UnsupportedError(f"{where}: {key} {str(rope)[:60]} is not supported; use a model without "
                                   "context extension")


def refuse_sliding_window(cfg: dict, where: str) -> None:
    """A window shorter than the context changes attention; a window of 0/None or use_sliding_window false
    does not."""
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        return
    if window in (None, 0):
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < cfg.get("max_position_embeddings", 0):
        raise UnsupportedError(f"{where}: sliding_window {str(window)[:40]} is not supported (attention over the whole "
                               "context only); set it to null if the model was trained without one")


def refuse_activation(cfg: dict, where: str) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"{where}: hidden_act {str(cfg['hidden_act'])[:40]!r} is not supported; the experts "
                               "of this family use silu")


def qwen_dense_layers(cfg: dict, where: str) -> dict:
    """Qwen's dense MLP layers between MoE layers: those in mlp_only_layers, and those whose (i + 1) is not a
    multiple of decoder_sparse_step; their width is intermediate_size."""
    only = cfg.get("mlp_only_layers") or []
    step = cfg.get("decoder_sparse_step") or 1
    n = cfg.get("num_hidden_layers")
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only) or \
            isinstance(step, bool) or not isinstance(step, int) or step < 1 or not isinstance(n, int):
        raise ModelFormatError(f"{where}: mlp_only_layers {str(only)[:40]} / decoder_sparse_step {str(step)[:20]} "
                               "must be a list of layer indices and a positive integer; the file is corrupt")
    dense = tuple(i for i in range(n) if i in only or (i + 1) % step)
    if not dense:
        return {}
    if not isinstance(cfg.get("intermediate_size"), int):
        raise ModelFormatError(f"{where}: dense layers {list(dense)[:8]} need intermediate_size; the file is corrupt")
    return {"dense_layers": dense, "dense_intermediate_size": cfg["intermediate_size"]}


def renamed(cfg: dict, names: dict[str, str]) -> dict:
    """cfg with the family's key names → ModelArgs names (the family's key replaces a same-named one: Qwen's
    intermediate_size is its dense MLP's width, moe_intermediate_size the experts')."""
    out = dict(cfg)
    for old, new in names.items():
        if cfg.get(old) is not None:
            out[new] = cfg[old]
    return out
