"""DeepSeek-V3 (V3, R1, V3.1): DeepSeek-V2's latent attention, dense first layers and shared experts, with
sigmoid scores whose selection adds e_score_correction_bias (selection only: the weights are the unbiased
scores), groups ranked by the sum of their two best choices, weights renormalised when norm_topk_prob, then ×
routed_scaling_factor. The multi-token-prediction layer (num_nextn_predict_layers) is not used: decoding reads
the main layers only. GGUF: arch `deepseek2`, like V2 (see loader: gating function sigmoid).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .deepseek_v2 import SPEC as V2
from .deepseek_v2 import check_groups, mla_config

log = logging.getLogger(__name__)


def hf_config(cfg: dict, where: str) -> dict:
    out = mla_config(cfg, where)
    if cfg.get("num_nextn_predict_layers"):
        log.info("%s: the multi-token-prediction layer is not used (decoding reads the main layers only)", where)
    groups = (cfg.get("n_group") or 1, cfg.get("topk_group") or 1)
    return {**out, **check_groups(groups, out, where), "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)),
            "group_score": "top2", "scoring": "sigmoid", "rope_interleave": bool(cfg.get("rope_interleave", True))}


SPEC = replace(V2, model_type="deepseek_v3", gguf_arch="deepseek2", title="DeepSeek-V3", hf_config=hf_config)
