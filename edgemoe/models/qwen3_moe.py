"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Mixtral's layout plus an RMSNorm over each head of q and k
before RoPE; softmax → top-k, renormalised when norm_topk_prob (llama.cpp always renormalises qwen3moe).
"""

from __future__ import annotations

from .arch import ArchSpec, qwen_dense_layers, refuse_activation, refuse_rope_scaling, refuse_sliding_window, renamed


def hf_config(cfg: dict, where: str) -> dict:
    refuse_rope_scaling(cfg, where)
    refuse_activation(cfg, where)
    refuse_sliding_window(cfg, where)
    dense = qwen_dense_layers(cfg, where)
    out = renamed(cfg, {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"})
    bias = bool(cfg.get("attention_bias", False))
    return {**out, **dense, "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)), "qk_norm": "head",
            "qkv_bias": bias, "o_bias": bias}


SPEC = ArchSpec(
    model_type="qwen3_moe",
    gguf_arch="qwen3moe",
    title="Qwen3-MoE",
    hf_config=hf_config,
    gguf_keys={"expert_feed_forward_length": "intermediate_size"},
    gguf_fixed={"norm_topk_prob": True, "qk_norm": "head"},
)
