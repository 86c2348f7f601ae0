"""OLMoE (OLMoE-1B-7B): an RMSNorm over the whole q and k projections (not per head) before RoPE, q/k/v
clamped to ±clip_qkv when set, softmax → top-k without renormalisation unless norm_topk_prob.
"""

from __future__ import annotations

import math
from numbers import Real

from ..errors import ModelFormatError
from .arch import ArchSpec, refuse_activation, refuse_rope_scaling, renamed


def hf_config(cfg: dict, where: str) -> dict:
    refuse_rope_scaling(cfg, where)
    refuse_activation(cfg, where)
    out = renamed(cfg, {"num_experts": "num_local_experts"})  # its intermediate_size is the experts' width
    bias = bool(cfg.get("attention_bias", False))
    clip = cfg.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, Real) or not math.isfinite(clip)
                             or clip <= 0):
        raise ModelFormatError(f"{where}: clip_qkv must be null or a positive number, found {str(clip)[:40]}; "
                               "the file is corrupt")
    return {**out, "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)), "qk_norm": "full",
            "qkv_bias": bias, "o_bias": bias, "clip_qkv": cfg.get("clip_qkv")}


SPEC = ArchSpec(
    model_type="olmoe",
    gguf_arch="olmoe",
    title="OLMoE",
    hf_config=hf_config,
    gguf_keys={"feed_forward_length": "intermediate_size", "expert_feed_forward_length": "intermediate_size"},
    gguf_fixed={"norm_topk_prob": False, "qk_norm": "full"},
)
