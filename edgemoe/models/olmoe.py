"""OLMoE (OLMoE-1B-7B): an RMSNorm over the whole q and k projections (not per head) before RoPE, q/k/v
clamped to ±clip_qkv when set, softmax → top-k without renormalisation unless norm_topk_prob.

Legend: T tokens, H/K query/key-value heads, d head_dim.
"""

from __future__ import annotations

import numpy as np

from .arch import ArchSpec, refuse_activation, refuse_rope_scaling, renamed
from .base import rms_norm


def hf_config(cfg: dict, where: str) -> dict:
    refuse_rope_scaling(cfg, where)
    refuse_activation(cfg, where)
    out = renamed(cfg, {"num_experts": "num_local_experts"})  # its intermediate_size is the experts' width
    bias = bool(cfg.get("attention_bias", False))
    return {**out, "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)), "qk_norm": "full",
            "qkv_bias": bias, "o_bias": bias, "clip_qkv": cfg.get("clip_qkv")}


def qkv_inputs(args, layer, q, k, v):
    """RMSNorm over all heads of q and of k, then the clamp.   q: (T, H, d); k, v: (T, K, d)"""
    T = q.shape[0]
    q = rms_norm(q.reshape(T, -1), layer.q_norm, args.rms_norm_eps).reshape(q.shape)  # (T, H, d)
    k = rms_norm(k.reshape(T, -1), layer.k_norm, args.rms_norm_eps).reshape(k.shape)  # (T, K, d)
    if args.clip_qkv is not None:
        c = np.float32(args.clip_qkv)
        q, k, v = np.clip(q, -c, c), np.clip(k, -c, c), np.clip(v, -c, c)
    return q, k, v


SPEC = ArchSpec(
    model_type="olmoe",
    gguf_arch="olmoe",
    title="OLMoE",
    hf_config=hf_config,
    gguf_keys={"feed_forward_length": "intermediate_size", "expert_feed_forward_length": "intermediate_size"},
    gguf_fixed={"norm_topk_prob": False, "qk_norm": "full"},
    qkv_inputs=qkv_inputs,
    fused_attention=False,
)
