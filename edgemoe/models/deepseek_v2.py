"""DeepSeek-V2 (V2, V2-Lite, V2.5): multi-head latent attention with a compressed KV cache, YaRN RoPE on the
rotary part, dense MLP layers before first_k_dense_replace, a shared SwiGLU expert (n_shared_experts wide, no gate)
added to the routed ones, routing softmax → top-k (greedy, or among the topk_group best of n_group groups) ×
routed_scaling_factor. DeepSeek-V3 (models/deepseek_v3.py) shares all but its routing.

GGUF: llama.cpp's arch `deepseek2` (V2 and V3), MLA written as MQA with one KV head: the latent and rotary key
come from `attn_kv_a_mqa`, the up-projections as `attn_k_b` (H, R, n) and `attn_v_b` (H, v, R) — older files
keep them as one `attn_kv_b`.

Legend: T tokens, D hidden, H heads, n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim,
R = kv_lora_rank, Q = q_lora_rank, S cache positions.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelFormatError, UnsupportedError
from ..kernels import mla, routing
from ..kv_cache import KVCache
from .arch import ArchSpec, refuse_activation, renamed
from .base import linear, rms_norm
from .rope import yarn_mscale, yarn_tables

HF_PARTS = {
    "q_a": "model.layers.{i}.self_attn.q_a_proj.weight",
    "q_a_norm": "model.layers.{i}.self_attn.q_a_layernorm.weight",
    "q_b": "model.layers.{i}.self_attn.q_b_proj.weight",
    "kv_a": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    "kv_a_norm": "model.layers.{i}.self_attn.kv_a_layernorm.weight",
    "kv_b": "model.layers.{i}.self_attn.kv_b_proj.weight",
    "shexp_gate": "model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    "shexp_up": "model.layers.{i}.mlp.shared_experts.up_proj.weight",
    "shexp_down": "model.layers.{i}.mlp.shared_experts.down_proj.weight",
    "router_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
}
GGUF_PARTS = {
    "q_a": "blk.{i}.attn_q_a.weight",
    "q_a_norm": "blk.{i}.attn_q_a_norm.weight",
    "q_b": "blk.{i}.attn_q_b.weight",
    "kv_a": "blk.{i}.attn_kv_a_mqa.weight",
    "kv_a_norm": "blk.{i}.attn_kv_a_norm.weight",
    "k_b": "blk.{i}.attn_k_b.weight",
    "v_b": "blk.{i}.attn_v_b.weight",
    "kv_b": "blk.{i}.attn_kv_b.weight",
    "router_bias": "blk.{i}.exp_probs_b.bias",
}


def yarn_of(cfg: dict, where: str) -> tuple | None:
    """The YaRN parameters of rope_parameters / rope_scaling, None for plain RoPE; other scalings refused."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelFormatError(f"{where}: rope_scaling {str(rope)[:60]} is not a mapping; the file is corrupt")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise UnsupportedError(f"{where}: rope scaling {str(kind)[:40]!r} is not supported (plain RoPE and YaRN are)")
    try:
        orig = int(rope["original_max_position_embeddings"])
        factor = rope.get("factor")
        factor = float(factor) if factor is not None else cfg["max_position_embeddings"] / orig
        out = (factor, orig, float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
               float(rope.get("mscale") or 0), float(rope.get("mscale_all_dim") or 0))
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"{where}: YaRN rope scaling {str(rope)[:80]} lacks factor or "
                               "original_max_position_embeddings; the file is corrupt") from None
    if not all(math.isfinite(x) for x in out) or out[0] <= 0 or orig <= 0:
        raise ModelFormatError(f"{where}: YaRN rope scaling {str(rope)[:80]} is out of range; the file is corrupt")
    return out


def mla_config(cfg: dict, where: str) -> dict:
    """The keys V2 and V3 share → ModelArgs fields."""
    refuse_activation(cfg, where)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError(f"{where}: attention_bias / mlp_bias are not supported for DeepSeek models")
    out = renamed(cfg, {"n_routed_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"})
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or not 0 < cfg[key] <= 4096:
            raise ModelFormatError(f"{where}: {key} must be a positive integer, found {str(cfg.get(key))[:40]}")
    q_rank = cfg.get("q_lora_rank")
    if q_rank is not None and (isinstance(q_rank, bool) or not isinstance(q_rank, int) or not 0 < q_rank <= 65536):
        raise ModelFormatError(f"{where}: q_lora_rank must be null or a positive integer, found {str(q_rank)[:40]}")
    if cfg["qk_rope_head_dim"] % 2:
        raise ModelFormatError(f"{where}: qk_rope_head_dim {cfg['qk_rope_head_dim']} is odd; RoPE needs pairs")
    n_layers = cfg.get("num_hidden_layers")
    first = cfg.get("first_k_dense_replace") or 0
    if isinstance(first, bool) or not isinstance(first, int) or first < 0 or not isinstance(n_layers, int):
        raise ModelFormatError(f"{where}: first_k_dense_replace must be a non-negative integer")
    shared = cfg.get("n_shared_experts") or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ModelFormatError(f"{where}: n_shared_experts must be a non-negative integer")
    scale = cfg.get("routed_scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ModelFormatError(f"{where}: routed_scaling_factor must be a positive number")
    inter = out.get("intermediate_size")
    out.update(
        head_dim=cfg["qk_rope_head_dim"], num_key_value_heads=cfg.get("num_attention_heads"),
        q_lora_rank=q_rank, kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
        routed_scaling_factor=float(scale), yarn=yarn_of(cfg, where),
        dense_layers=tuple(range(min(first, n_layers))), dense_intermediate_size=cfg.get("intermediate_size"),
        shared_expert_intermediate_size=shared * inter if isinstance(inter, int) else 0,
    )
    return out


def hf_config(cfg: dict, where: str) -> dict:
    out = mla_config(cfg, where)
    method = cfg.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedError(f"{where}: topk_method {str(method)[:40]!r} is not supported for DeepSeek-V2 "
                               "(greedy and group_limited_greedy are)")
    groups = (cfg.get("n_group") or 1, cfg.get("topk_group") or 1) if method == "group_limited_greedy" else (1, 1)
    return {**out, **check_groups(groups, out, where), "norm_topk_prob": False, "group_score": "max",
            "scoring": "softmax"}


def check_groups(groups: tuple, cfg: dict, where: str) -> dict:
    n_group, topk_group = groups
    E = cfg.get("num_local_experts")
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in groups) or not isinstance(E, int) or \
            E % n_group or topk_group > n_group:
        raise ModelFormatError(f"{where}: n_group {n_group} / topk_group {topk_group} do not divide the "
                               f"{E} experts into groups; the file is corrupt")
    return {"n_group": n_group, "topk_group": topk_group}


# ------------------------------------------------------------------ the forward pass's parts

def rope_tables(args, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, r/2) of the rotary part, YaRN-scaled when the config says."""
    return yarn_tables(positions, args.qk_rope_head_dim, float(args.rope_theta), args.yarn)


def softmax_scale(args) -> float:
    """1/sqrt(n + r), × mscale² of mscale_all_dim under YaRN (transformers' yarn_apply_mscale)."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if args.yarn is not None and args.yarn[5]:
        m = yarn_mscale(args.yarn[0], args.yarn[5])
        scale = scale * m * m
    return scale


class LatentCache(KVCache):
    """Per layer and position the normalised latent (R) and the rotary key (r), in the cache's type (f32, f16 or
    q8_0 as `--cache-type` says, rounded as KVCache rounds): `k` holds [latent ; k_pe] as one head of R + r
    values; `v` is empty (values are up-projected from the latent)."""

    def __init__(self, n_layers: int, n_ctx: int, width: int, cache_type: str = "f16"):
        super().__init__(n_layers, 0, 1, width, cache_type)  # checks the type; no values
        self.n_ctx = n_ctx
        self.k = np.zeros((n_layers, 1, n_ctx, self.k.shape[3]), dtype=self.k.dtype)  # (L, 1, S, W)

    def write_rows(self, layer: int, pos: int, rows: np.ndarray) -> None:
        """Positions pos .. pos+n-1 of `layer`.   rows: (n, R + r) float32"""
        self.k[layer, 0, pos:pos + rows.shape[0]] = self._stored(rows[None])[0]

    @property
    def row_bytes(self) -> int:
        L, _, _, W = self.k.shape
        return L * W * self.k.itemsize

    def load_prefix(self, k: np.ndarray, v: np.ndarray, n: int) -> None:
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3] or k.dtype != self.k.dtype:
            raise ValueError(f"a KV prefix of shape {k.shape} does not fit a cache of shape {self.k.shape}")
        self.reserve(n - self.length)
        self.k[:, :, :n] = k[:, :, :n]
        self.length = n


def new_cache(args, n_ctx: int, cache_type: str) -> LatentCache:
    """The compressed cache (~(R + r) / (2 H d) of a full one) in `cache_type`."""
    return LatentCache(args.num_hidden_layers, n_ctx, args.kv_lora_rank + args.qk_rope_head_dim, cache_type)


def attention(model, x: np.ndarray, layer, i: int, seqs, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """MLA for every sequence of the pass.   x: (T, D) normalised; cos, sin: (T, r/2) → (T, D)"""
    a = model.args
    T = x.shape[0]
    H, n, r, v, R = (a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank)
    ex = layer.extra
    if a.q_lora_rank is None:
        q = linear(x, layer.q_proj)  # (T, H (n + r))
    else:
        q = linear(rms_norm(linear(x, ex["q_a"]), ex["q_a_norm"], a.rms_norm_eps), ex["q_b"])  # (T, H (n + r))
    q = q.reshape(T, H, n + r)
    q_nope = np.ascontiguousarray(q[:, :, :n])  # (T, H, n)
    q_pe = np.ascontiguousarray(q[:, :, n:])  # (T, H, r)
    ckv = linear(x, ex["kv_a"])  # (T, R + r)
    latent = rms_norm(np.ascontiguousarray(ckv[:, :R]), ex["kv_a_norm"], a.rms_norm_eps)  # (T, R)
    k_pe = np.ascontiguousarray(ckv[:, R:]).reshape(T, 1, r)  # (T, 1, r)
    if a.rope_interleave:
        mla.rope_pairs_inplace(q_pe, cos, sin)
        mla.rope_pairs_inplace(k_pe, cos, sin)
    else:
        from ..kernels import ops

        ops.rope_inplace(q_pe, cos, sin)
        ops.rope_inplace(k_pe, cos, sin)
    out = np.empty((T, H, v), np.float32)  # (T, H, v)
    for r0, m, cache in seqs:
        p = cache.length
        cache.write_rows(i, p, np.concatenate([latent[r0:r0 + m], k_pe[r0:r0 + m, 0]], axis=1))  # (m, R + r)
        mla.mla_attention(out[r0:r0 + m], q_nope[r0:r0 + m], q_pe[r0:r0 + m], cache.k[i, 0], ex["w_uk"],
                          ex["w_uv"], p, model.scale)
    return linear(out.reshape(T, H * v), layer.o_proj)  # (T, D)


def route(model, x: np.ndarray, layer) -> tuple[np.ndarray, np.ndarray]:
    """x: (T, D) → ids (T, A), weights (T, A)"""
    a = model.args
    logits = linear(x, layer.gate)  # (T, E)
    T = x.shape[0]
    ids = np.empty((T, a.num_experts_per_tok), np.int64)
    w = np.empty((T, a.num_experts_per_tok), np.float32)
    bias = layer.extra.get("router_bias", NO_BIAS)
    routing.route_grouped(ids, w, logits, bias, a.scoring == "sigmoid", a.n_group, a.topk_group,
                          a.group_score == "top2", a.norm_topk_prob, a.routed_scaling_factor)
    return ids, w


NO_BIAS = np.zeros(0, np.float32)


def attention_parts(args) -> list[str]:
    q = ["q"] if args.q_lora_rank is None else ["q_a", "q_a_norm", "q_b"]
    return [*q, "kv_a", "kv_a_norm", "kv_b", "o"]


def finish_layer(t: dict, args) -> dict:
    """The up-projections w_uk (H, n, R) and w_uv (H, v, R) in float32 instead of HF's kv_b_proj (H (n + v), R)
    or GGUF's k_b (H, R, n) and v_b (H, v, R) (dequantised once: the attention kernel reads them every token)."""
    t = dict(t)
    t["w_uk"], t["w_uv"] = _up_projections(t, args)
    for p in ("kv_b", "k_b", "v_b"):
        t.pop(p, None)
    return t


def _up_projections(t: dict, args) -> tuple[np.ndarray, np.ndarray]:
    from ..quants import dequantize_qtensor

    H, n, v, R = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    if "k_b" in t:
        k_b = np.stack([dequantize_qtensor(m) for m in t["k_b"]]).reshape(H, R, n)
        v_b = np.stack([dequantize_qtensor(m) for m in t["v_b"]]).reshape(H, v, R)
        return np.ascontiguousarray(k_b.transpose(0, 2, 1), np.float32), np.ascontiguousarray(v_b, np.float32)
    kv_b = dequantize_qtensor(t["kv_b"]).reshape(H, n + v, R)
    return np.ascontiguousarray(kv_b[:, :n], np.float32), np.ascontiguousarray(kv_b[:, n:], np.float32)




def gguf_config(cfg: dict, meta: dict, tensors: dict, where: str) -> dict:
    """llama.cpp's `deepseek2` keys (V2 and V3 alike) → ModelArgs fields. V3 is told by its sigmoid gating
    function; YaRN's mscale is not stored (only 0.1 × mscale_all_dim as yarn_log_multiplier), and is taken equal
    to mscale_all_dim, as in every released DeepSeek config (the attention factor is then 1)."""
    a = "deepseek2."

    def key(name, default=None, kind=int):
        v = meta.get(a + name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ModelFormatError(f"{where}: {a}{name} is {str(v)[:40]}, not a number; the file is corrupt")
        return kind(v)

    kv_rank, rope_dim = key("attention.kv_lora_rank"), key("rope.dimension_count")
    k_mla, v_mla = key("attention.key_length_mla"), key("attention.value_length_mla")
    if None in (kv_rank, rope_dim, k_mla, v_mla):
        raise UnsupportedError(f"{where}: this deepseek2 file lacks the MLA keys (attention.kv_lora_rank, "
                               "key_length_mla, value_length_mla); convert it with a current llama.cpp")
    if not (0 < kv_rank and 0 < rope_dim < k_mla and rope_dim % 2 == 0 and 0 < v_mla):
        raise ModelFormatError(f"{where}: MLA sizes kv_lora_rank {kv_rank}, rope.dimension_count {rope_dim}, "
                               f"key_length_mla {k_mla}, value_length_mla {v_mla} are inconsistent; the file is corrupt")
    yarn = None
    if meta.get(a + "rope.scaling.type") == "yarn":
        log_mul = key("rope.scaling.yarn_log_multiplier", 0.0, float)
        mscale = log_mul / 0.1
        yarn = (key("rope.scaling.factor", None, float), key("rope.scaling.original_context_length"),
                key("rope.scaling.yarn_beta_fast", 32.0, float), key("rope.scaling.yarn_beta_slow", 1.0, float),
                mscale, mscale)
        if yarn[0] is None or yarn[1] is None:
            raise ModelFormatError(f"{where}: YaRN scaling without rope.scaling.factor / original_context_length")
    elif meta.get(a + "rope.scaling.type") not in (None, "none"):
        raise UnsupportedError(f"{where}: rope scaling {str(meta[a + 'rope.scaling.type'])[:40]!r} is not supported")
    sigmoid = key("expert_gating_func", 1) == 2
    n_shared = key("expert_shared_count", 0)
    ff_exp = cfg.get("intermediate_size")
    dense = key("leading_dense_block_count", 0)
    out = {**cfg, "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
           "num_key_value_heads": cfg.get("num_attention_heads"), "head_dim": rope_dim,
           "q_lora_rank": key("attention.q_lora_rank"), "kv_lora_rank": kv_rank, "qk_rope_head_dim": rope_dim,
           "qk_nope_head_dim": k_mla - rope_dim, "v_head_dim": v_mla, "yarn": yarn,
           "routed_scaling_factor": key("expert_weights_scale", 1.0, float),
           "norm_topk_prob": bool(meta.get(a + "expert_weights_norm", False)),
           "dense_layers": tuple(range(min(dense, cfg.get("num_hidden_layers") or 0))),
           "dense_intermediate_size": key("feed_forward_length", 0),
           "shared_expert_intermediate_size": n_shared * ff_exp if isinstance(ff_exp, int) else 0,
           "scoring": "sigmoid" if sigmoid else "softmax", "group_score": "top2" if sigmoid else "max",
           "rope_interleave": True, "qkv_bias": False, "o_bias": False}
    groups = (key("expert_group_count", 1) or 1, key("expert_group_used_count", 1) or 1)
    return {**out, **check_groups(groups, out, where)}


SPEC = ArchSpec(
    model_type="deepseek_v2",
    gguf_arch="deepseek2",
    title="DeepSeek-V2",
    hf_config=hf_config,
    gguf_keys={"expert_feed_forward_length": "intermediate_size"},
    hf_parts=HF_PARTS,
    gguf_parts=GGUF_PARTS,
    fused_attention=False,
    shared_gate=False,
    attention_parts=attention_parts,
    attention=attention,
    route=route,
    rope_tables=rope_tables,
    new_cache=new_cache,
    softmax_scale=softmax_scale,
    finish_layer=finish_layer,
    gguf_config=gguf_config,
)
