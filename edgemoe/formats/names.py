"""GGUF ↔ Hugging Face name and key maps for the `llama` architecture with experts (Mixtral), and the expert
tensor names every family shares (the families' other names: models/arch.py and each family's file).

Inside the engine every weight is named by its HF name; experts are addressed as (layer, expert, proj)
with proj in ("gate", "up", "down") = HF Mixtral (w1, w3, w2).
"""

from __future__ import annotations

import numpy as np

# GGUF tensor name → HF name; `{i}` is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
}

# Merged expert tensors (E, out, in) in current GGUF files, per projection.
GGUF_EXPERTS = {"gate": "blk.{i}.ffn_gate_exps.weight", "up": "blk.{i}.ffn_up_exps.weight",
                "down": "blk.{i}.ffn_down_exps.weight"}
# One tensor per expert, as older Mixtral GGUF files store them.
GGUF_EXPERT_SPLIT = {"gate": "blk.{i}.ffn_gate.{e}.weight", "up": "blk.{i}.ffn_up.{e}.weight",
                     "down": "blk.{i}.ffn_down.{e}.weight"}

# HF checkpoints: the fused 3-D layout: gate_up_proj (E, 2*I, D) = [gate; up], down_proj (E, D, I).
HF_EXPERT_FUSED = {"gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
                   "down": "model.layers.{i}.mlp.experts.down_proj"}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → GGUF row order of a Q or K projection, as llama.cpp's converter writes it.

    Each head's rows go from [first half | second half] (rotate_half RoPE) to interleaved pairs.
    w: (n_head * head_dim, ...)
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF → HF row order of a Q or K projection: the exact inverse of `permute_qk`.

    Works on raw quantised rows too (the permutation moves whole rows).
    w: (n_head * head_dim, ...)
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
