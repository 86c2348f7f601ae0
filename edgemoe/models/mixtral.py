"""Mixtral: grouped-query attention with RoPE, a sparse MoE of SwiGLU experts (softmax → top-k → renormalise).

GGUF: llama.cpp writes it as arch `llama` with experts, Q/K rows permuted for its interleaved RoPE.
"""

from __future__ import annotations

from ..errors import ModelFormatError
from .arch import ArchSpec, refuse_activation, refuse_rope_scaling, refuse_sliding_window


def hf_config(cfg: dict, where: str) -> dict:
    refuse_rope_scaling(cfg, where)
    refuse_activation(cfg, where)
    refuse_sliding_window(cfg, where)
    if cfg.get("num_key_value_heads") is None:  # transformers would take MixtralConfig's default (8), not H
        raise ModelFormatError(f"{where} lacks num_key_value_heads; restore the checkpoint's config.json")
    return {**cfg, "norm_topk_prob": True}


SPEC = ArchSpec(
    model_type="mixtral",
    gguf_arch="llama",
    title="Mixtral",
    hf_config=hf_config,
    gguf_keys={"feed_forward_length": "intermediate_size", "expert_feed_forward_length": "intermediate_size"},
    gguf_fixed={"norm_topk_prob": True},
    permute_qk=True,
    hf_router_aliases=("model.layers.{i}.block_sparse_moe.gate.weight",),
    hf_expert_split={"gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                     "up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
                     "down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"},
)
