"""The model's shape and constants, shared by every family: HF `config.json` names where one exists.

Each family's file (models/<model_type>.py) builds these from its own config keys or GGUF metadata and
refuses what it cannot honour; the forward pass (models/moe.py) reads only this.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per routed expert (HF Mixtral's name; Qwen/OLMoE call it moe_intermediate_size)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    model_type: str = "mixtral"
    norm_topk_prob: bool = True  # the top-k routing weights renormalised to sum to 1 (Mixtral, Qwen3-MoE)
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "head" (over each head, Qwen3) or "full" (OLMoE)
    qkv_bias: bool = False  # q, k and v projections have biases (Qwen2-MoE)
    o_bias: bool = False  # the output projection has a bias
    clip_qkv: float | None = None  # q, k and v clamped to ±clip_qkv after the projections (OLMoE)
    shared_expert_intermediate_size: int = 0  # a dense SwiGLU expert every token takes, gated by a sigmoid
    dense_layers: tuple[int, ...] = ()  # layers with a dense SwiGLU MLP instead of experts (no router)
    dense_intermediate_size: int = 0  # that MLP's width
    # routing beyond softmax → top-k (DeepSeek): scores "softmax" | "sigmoid"; experts in n_group groups of which
    # the topk_group best (by max score, or by the sum of the best two with a correction bias) are eligible;
    # the chosen weights × routed_scaling_factor
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2 group_limited_greedy) | "top2" (DeepSeek-V3 noaux_tc)
    routed_scaling_factor: float = 1.0
    # multi-head latent attention (DeepSeek): None = ordinary GQA
    q_lora_rank: int | None = None  # q through a rank-q_lora_rank bottleneck with an RMSNorm; None: one q_proj
    kv_lora_rank: int = 0  # the cached latent's width (keys and values are up-projected from it)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # rotary part of each key, shared by all heads and cached beside the latent
    v_head_dim: int = 0
    # YaRN rotary scaling (rope_type "yarn"); None: plain RoPE
    yarn: tuple | None = None  # (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim)
    rope_interleave: bool = True  # MLA's rotary part rotates adjacent pairs (else the halves, as elsewhere)
    yarn_truncate: bool = True  # YaRN's correction range rounded to whole dimensions (gpt-oss: not)
    # gpt-oss: attention over the last sliding_window positions in sliding_layers; the experts' clamped SwiGLU
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        """Build from a dict already translated and checked by the family's spec (models/arch.py)."""
        names = inspect.signature(cls).parameters
        cfg = {**cfg, "dense_layers": tuple(sorted(int(i) for i in cfg.get("dense_layers") or ()))}
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    def is_moe(self, i: int) -> bool:
        """Layer i routes its tokens to experts (else it has a dense MLP)."""
        return i not in self.dense_layers
