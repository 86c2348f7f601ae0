"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases, softmax → top-k (renormalised only with
norm_topk_prob; llama.cpp never renormalises qwen2moe), and a shared SwiGLU expert every token takes,
scaled by sigmoid(shared_expert_gate · h) and added to the routed experts' sum.
"""

from __future__ import annotations

from .arch import ArchSpec, qwen_dense_layers, refuse_activation, refuse_rope_scaling, refuse_sliding_window, renamed


def hf_config(cfg: dict, where: str) -> dict:
    refuse_rope_scaling(cfg, where)
    refuse_activation(cfg, where)
    refuse_sliding_window(cfg, where)
    dense = qwen_dense_layers(cfg, where)
    out = renamed(cfg, {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"})
    return {**out, **dense, "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "qkv_bias": bool(cfg.get("qkv_bias", True)),
            "shared_expert_intermediate_size": cfg.get("shared_expert_intermediate_size") or 0}


SPEC = ArchSpec(
    model_type="qwen2_moe",
    gguf_arch="qwen2moe",
    title="Qwen2-MoE",
    hf_config=hf_config,
    gguf_keys={"expert_feed_forward_length": "intermediate_size",
               "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    gguf_fixed={"norm_topk_prob": False, "qkv_bias": True},
)
