"""gpt-oss (gpt-oss-20b, gpt-oss-120b): grouped-query attention with q/k/v/o biases, a learned sink logit per
head, sliding-window (layer_types "sliding_attention") and full layers alternating, YaRN RoPE on the halves;
the router has a bias and takes the top-k logits before its softmax; experts have biases and a clamped SwiGLU:
(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g) with g = min(gate, limit).

HF checkpoints keep gate and up interleaved in one (E, D, 2I) tensor (x @ W, not W x) with its bias (E, 2I);
llama.cpp's converter writes them apart, as usual (E, I, D) expert tensors with `.bias` companions, and the
sinks as `attn_sinks.weight`. The released checkpoints store the experts in MXFP4 (`*_blocks` + `*_scales`,
`quantization_config.quant_method` "mxfp4"); their bits become ggml's MXFP4 rows unchanged, as llama.cpp's
converter writes them.

Legend: T tokens, D hidden, H/K query/key-value heads, d head_dim, E experts, I expert width.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelFormatError, UnsupportedError
from ..experts.store import Expert
from ..kernels import ops, routing
from ..qtensor import QTensor
from .arch import ArchSpec, refuse_activation
from .base import linear
from .deepseek_v2 import yarn_of
from .rope import yarn_tables

HF_PARTS = {
    "sinks": "model.layers.{i}.self_attn.sinks",
    "router": "model.layers.{i}.mlp.router.weight",
    "router_b": "model.layers.{i}.mlp.router.bias",
    "exp_gate_up_b": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "exp_down_b": "model.layers.{i}.mlp.experts.down_proj_bias",
}
GGUF_PARTS = {
    "sinks": "blk.{i}.attn_sinks.weight",
    "ffn_norm": "blk.{i}.post_attention_norm.weight",
    "router_b": "blk.{i}.ffn_gate_inp.bias",
    "exp_gate_b": "blk.{i}.ffn_gate_exps.bias",
    "exp_up_b": "blk.{i}.ffn_up_exps.bias",
    "exp_down_b": "blk.{i}.ffn_down_exps.bias",
}


def hf_config(cfg: dict, where: str) -> dict:
    refuse_activation(cfg, where)
    quant = cfg.get("quantization_config")
    if quant and not (isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"):
        raise UnsupportedError(f"{where}: an HF checkpoint quantised as {str(quant)[:40]} is not supported (its "
                               "experts in MXFP4, as released, or unquantised are); dequantise it or use a GGUF")
    types = cfg.get("layer_types") or []
    n = cfg.get("num_hidden_layers")
    if not isinstance(types, list) or len(types) != n or any(t not in ("sliding_attention", "full_attention")
                                                            for t in types):
        raise ModelFormatError(f"{where}: layer_types must list sliding_attention / full_attention for each of "
                               f"the {n} layers; the file is corrupt")
    window = cfg.get("sliding_window") or 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ModelFormatError(f"{where}: sliding_window must be a non-negative integer")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return {**cfg, **swiglu(cfg, where), "qkv_bias": True, "o_bias": True, "sliding_window": window,
            "sliding_layers": tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
            "yarn": yarn_of(cfg, where), "yarn_truncate": bool(rope.get("truncate", True)) if isinstance(rope, dict)
            else True, "norm_topk_prob": True}


def swiglu(cfg: dict, where: str) -> dict:
    alpha, limit = cfg.get("swiglu_alpha", 1.702), cfg.get("swiglu_limit", 7.0)
    for name, v in (("swiglu_alpha", alpha), ("swiglu_limit", limit)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ModelFormatError(f"{where}: {name} must be a positive number, found {str(v)[:40]}")
    return {"swiglu_alpha": float(alpha), "swiglu_limit": float(limit)}


def gguf_config(cfg: dict, meta: dict, tensors: dict, where: str) -> dict:
    """llama.cpp's `gpt-oss` keys: sliding_window; every other layer (the first) slides, as llama.cpp assumes;
    YaRN from rope.scaling.* (transformers' gpt-oss config does not truncate the correction range)."""
    a = "gpt-oss."
    yarn = None
    if meta.get(a + "rope.scaling.type") == "yarn":
        yarn = (float(meta.get(a + "rope.scaling.factor", 1.0)),
                int(meta.get(a + "rope.scaling.original_context_length", 4096)),
                float(meta.get(a + "rope.scaling.yarn_beta_fast", 32.0)),
                float(meta.get(a + "rope.scaling.yarn_beta_slow", 1.0)), 0.0, 0.0)
    window = int(meta.get(a + "attention.sliding_window", 0))
    n = cfg.get("num_hidden_layers") or 0
    return {**cfg, "qkv_bias": True, "o_bias": True, "sliding_window": window,
            "sliding_layers": tuple(range(0, n, 2)) if window else (), "yarn": yarn, "yarn_truncate": False,
            "swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def rope_tables(args, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return yarn_tables(positions, args.head_dim, float(args.rope_theta), args.yarn, args.yarn_truncate)


def sinks_window(layer, i: int, args) -> tuple[np.ndarray, int]:
    """Layer i's sinks (H,) and its window (0: full attention)."""
    return layer.extra["sinks"], args.sliding_window if i in args.sliding_layers else 0


def route(model, x: np.ndarray, layer) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the biased router logits, softmax over those k.   x: (T, D) → ids (T, A), weights (T, A)"""
    logits = linear(x, layer.gate) + layer.extra["router_b"]  # (T, E)
    T, A = x.shape[0], model.args.num_experts_per_tok
    ids, w = np.empty((T, A), np.int64), np.empty((T, A), np.float32)
    routing.route_topk_softmax(ids, w, logits)
    return ids, w


def expert_fn(x: np.ndarray, ex: Expert, layer, e: int, args) -> np.ndarray:
    """(clamp(up, ±limit) + 1) · g σ(α g), g = min(gate, limit), then down; biases on all three (the fused expert
    blocks compute the same bits from `moe_extras`).   x: (n, D) → (n, D)"""
    ext = layer.extra
    h = np.empty((x.shape[0], ex.gate.rows), np.float32)  # (n, I)
    ops.clamped_swiglu(h, linear(x, ex.gate), linear(x, ex.up), ext["exp_gate_b"][e], ext["exp_up_b"][e],
                       args.swiglu_alpha, args.swiglu_limit)
    return linear(h, ex.down) + ext["exp_down_b"][e]  # (n, D)


def moe_extras(layer, args) -> tuple:
    """What the fused expert blocks add to plain SwiGLU: the experts' read-only biases gate (E, I), up (E, I)
    and down (E, D), and the activation's alpha and limit."""
    ext = layer.extra
    return ext["exp_gate_b"], ext["exp_up_b"], ext["exp_down_b"], args.swiglu_alpha, args.swiglu_limit


def moe_parts(args, fmt: str) -> list[str]:
    return ["router_b", "exp_gate_up_b", "exp_down_b"] if fmt == "hf" else \
        ["router_b", "exp_gate_b", "exp_up_b", "exp_down_b"]


def attention_parts(args) -> list[str]:
    return ["q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "sinks"]


def finish_layer(t: dict, args) -> dict:
    """Biases and sinks as read-only float32 arrays: router (E,), experts' gate/up (E, I) (HF: de-interleaved),
    down (E, D), sinks (H,)."""
    from ..quants import dequantize_qtensor

    def arr(w):
        return np.ascontiguousarray(dequantize_qtensor(w) if isinstance(w, QTensor) else w, dtype=np.float32)

    t = {p: arr(w) for p, w in t.items()}
    if "exp_gate_up_b" in t:
        gu = t.pop("exp_gate_up_b")  # (E, 2I): gate, up interleaved
        t["exp_gate_b"], t["exp_up_b"] = np.ascontiguousarray(gu[:, ::2]), np.ascontiguousarray(gu[:, 1::2])
    for a in t.values():
        a.flags.writeable = False  # like the model's other vectors: one Numba type for the kernels taking them
    return t


HF_MXFP4 = ("model.layers.{i}.mlp.experts.gate_up_proj_blocks", "model.layers.{i}.mlp.experts.gate_up_proj_scales",
            "model.layers.{i}.mlp.experts.down_proj_blocks", "model.layers.{i}.mlp.experts.down_proj_scales")


def hf_experts(idx, args, i: int, need) -> list[Expert]:
    """The released checkpoints' MXFP4 experts (`hf_mxfp4_experts`), or gate_up_proj (E, D, 2I) with gate and up
    interleaved and down_proj (E, I, D), as HF stores them unquantised (x @ W)."""
    from gguf import GGMLQuantizationType

    from ..quants import dequantize_qtensor

    if HF_MXFP4[0].format(i=i) in idx:
        return hf_mxfp4_experts(idx, args, i, need)
    gate_up = idx.matrices(need(f"model.layers.{i}.mlp.experts.gate_up_proj"))  # E × (D, 2I)
    down = idx.matrices(need(f"model.layers.{i}.mlp.experts.down_proj"))  # E × (I, D)
    F32 = GGMLQuantizationType.F32
    out = []
    for gu, dn in zip(gate_up, down):
        w = np.ascontiguousarray(dequantize_qtensor(gu).T, dtype=np.float32)  # (2I, D)
        g, u = np.ascontiguousarray(w[::2]), np.ascontiguousarray(w[1::2])  # (I, D) each
        wd = np.ascontiguousarray(dequantize_qtensor(dn).T, dtype=np.float32)  # (D, I)
        out.append(Expert(QTensor.from_array(g, F32, *g.shape), QTensor.from_array(u, F32, *u.shape),
                          QTensor.from_array(wd, F32, *wd.shape)))
    return out


def hf_mxfp4_experts(idx, args, i: int, need) -> list[Expert]:
    """gate_up_proj_blocks (E, 2I, D/32, 16) with scales (E, 2I, D/32), gate and up rows interleaved, and
    down_proj_blocks (E, D, I/32, 16) with scales (E, D, I/32): out-feature rows (W x), each an MXFP4 QTensor."""
    from gguf import GGMLQuantizationType

    from ..quants.mxfp4 import from_hf_mxfp4

    E, D, n_i = args.num_local_experts, args.hidden_size, args.intermediate_size
    names = [t.format(i=i) for t in HF_MXFP4]
    gu_b, gu_s, dn_b, dn_s = (idx.raw_bytes(need(n), 4 if n.endswith("blocks") else 3) for n in names)
    for k, blocks, scales, rows, cols in ((0, gu_b, gu_s, 2 * n_i, D), (2, dn_b, dn_s, D, n_i)):
        if cols % 32 or blocks.shape != (E, rows, cols // 32, 16) or scales.shape != (E, rows, cols // 32):
            raise ModelFormatError(f"{names[k]} / {names[k + 1]}: shapes {blocks.shape} and {scales.shape}, expected "
                                   f"{(E, rows, cols // 32, 16)} and {(E, rows, cols // 32)} for this config.json; "
                                   "the checkpoint is corrupt")
    MX = GGMLQuantizationType.MXFP4
    gate_up = from_hf_mxfp4(gu_b, gu_s)  # (E, 2I, D/32 * 17)
    down = from_hf_mxfp4(dn_b, dn_s)  # (E, D, I/32 * 17)
    return [Expert(QTensor(np.ascontiguousarray(gate_up[e, 0::2]), MX, n_i, D),
                   QTensor(np.ascontiguousarray(gate_up[e, 1::2]), MX, n_i, D),
                   QTensor(down[e], MX, D, n_i)) for e in range(E)]


SPEC = ArchSpec(
    model_type="gpt_oss",
    gguf_arch="gpt-oss",
    title="gpt-oss",
    hf_config=hf_config,
    gguf_keys={"expert_feed_forward_length": "intermediate_size"},
    hf_parts=HF_PARTS,
    gguf_parts=GGUF_PARTS,
    moe_extras=moe_extras,
    attention_parts=attention_parts,
    sinks_window=sinks_window,
    route=route,
    rope_tables=rope_tables,
    moe_parts=moe_parts,
    finish_layer=finish_layer,
    hf_experts=hf_experts,
    hf_expert_tensors=HF_MXFP4,
    expert_fn=expert_fn,
    gguf_config=gguf_config,
)
