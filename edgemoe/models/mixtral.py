"""Mixtral: grouped-query attention with RoPE, and a sparse MoE of SwiGLU experts (softmax → top-k → renormalise).

Legend: T = tokens in the step, D = hidden_size, H = num_attention_heads, K = num_key_value_heads,
d = head_dim, E = num_local_experts, A = num_experts_per_tok, V = vocab_size, S = cache positions.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np

from ..experts.store import ExpertStore
from ..kernels import ops
from ..kernels.q4x8 import interleave_if_q4_0
from ..kv_cache import KVCache
from ..qtensor import QTensor
from .base import linear, rms_norm, switch_glu


@dataclass(frozen=True)
class ModelArgs:
    """The model's shape and constants, with Hugging Face `config.json` names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert
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

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        """Build from a config dict, ignoring keys this architecture does not use."""
        cfg = dict(cfg)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})


@dataclass
class Layer:
    input_layernorm: np.ndarray  # (D,)
    q_proj: QTensor  # (H*d, D)
    k_proj: QTensor  # (K*d, D)
    v_proj: QTensor  # (K*d, D)
    o_proj: QTensor  # (D, H*d)
    post_attention_layernorm: np.ndarray  # (D,)
    gate: QTensor  # router (E, D)


@dataclass
class Weights:
    embed_tokens: QTensor  # (V, D)
    layers: list[Layer]
    norm: np.ndarray  # (D,)
    lm_head: QTensor  # (V, D); the embedding itself when tied


def _stacked(*ws: QTensor) -> QTensor | None:
    """The matrices' rows in one QTensor (a copy), or None when their types or widths differ."""
    if len({(w.qtype, w.cols) for w in ws}) != 1:
        return None
    return QTensor(np.concatenate([w.data for w in ws]), ws[0].qtype, sum(w.rows for w in ws), ws[0].cols)


class Model:
    """Mixtral forward pass over a KV cache; experts come from an ExpertStore."""

    def __init__(self, args: ModelArgs, weights: Weights, experts: ExpertStore, embed_rows):
        self.args = args
        self.weights = weights
        self.experts = experts
        self.embed_rows = embed_rows  # ids (T,) → (T, D) float32, dequantising only those rows
        self.scale = np.float32(1.0 / math.sqrt(args.head_dim))
        # q, k and v of a layer as one matrix where they share a type: one kernel call for all three
        self.qkv = [_stacked(layer.q_proj, layer.k_proj, layer.v_proj) for layer in weights.layers]

    def dense_nbytes(self) -> int:
        """Bytes of the dense tensors a forward pass reads (q, k, v counted once when stacked)."""
        w = self.weights
        n = sum(layer.input_layernorm.nbytes + layer.post_attention_layernorm.nbytes + layer.o_proj.nbytes
                + layer.gate.nbytes for layer in w.layers)
        n += sum(qkv.nbytes if qkv is not None else layer.q_proj.nbytes + layer.k_proj.nbytes + layer.v_proj.nbytes
                 for qkv, layer in zip(self.qkv, w.layers))
        return n + w.norm.nbytes + w.lm_head.nbytes

    def own_dense(self) -> None:
        """Copy the dense tensors a forward pass reads out of the memory-mapped file into process memory.

        When experts stream inside a memory limit, the kernel reclaims clean file pages first: a
        memory-mapped norm or attention matrix would be dropped and faulted back in from the disk,
        behind the expert reads, once per token. (The embedding stays mapped: a step reads a few rows.)
        """
        def own(w):
            if isinstance(w, QTensor):
                return QTensor(np.array(w.data), w.qtype, w.rows, w.cols, w.interleave)
            return np.array(w)

        for i, layer in enumerate(self.weights.layers):
            names = ["input_layernorm", "o_proj", "post_attention_layernorm", "gate"]
            if self.qkv[i] is None:
                names += ["q_proj", "k_proj", "v_proj"]
            else:
                self.qkv[i] = own(self.qkv[i])
            for name in names:
                setattr(layer, name, own(getattr(layer, name)))
        self.weights.norm = own(self.weights.norm)
        self.weights.lm_head = own(self.weights.lm_head)

    def repack(self, experts: bool) -> None:
        """Keep the Q4_0 matrices the kernels read in the 8-row interleaved layout (kernels/q4x8.py,
        ~1.5x faster per core): attention and output head (copies), and the experts too when
        `experts` (a resident store copies them now, a streaming store repacks each as it arrives)."""

        def x8(w: QTensor | None) -> QTensor | None:
            return None if w is None else interleave_if_q4_0(w)

        self.qkv = [x8(w) for w in self.qkv]
        for i, layer in enumerate(self.weights.layers):
            if self.qkv[i] is None:
                layer.q_proj, layer.k_proj, layer.v_proj = x8(layer.q_proj), x8(layer.k_proj), x8(layer.v_proj)
            layer.o_proj = x8(layer.o_proj)
        self.weights.lm_head = x8(self.weights.lm_head)  # the embedding lookup keeps its own plain copy
        if experts:
            self.experts.repack_q4_0()

    def new_cache(self, n_ctx: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, n_ctx, a.num_key_value_heads, a.head_dim)

    def attention(self, x: np.ndarray, layer: Layer, i: int, seqs: list[tuple[int, int, KVCache]],
                  cos, sin) -> np.ndarray:
        """Each sequence's tokens attend to its own cache.  x: (T, D); seqs: (start row, rows, cache) → (T, D)"""
        a = self.args
        T = x.shape[0]
        H, K, d = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        if self.qkv[i] is not None:
            qkv = linear(x, self.qkv[i])  # (T, (H + 2K) d)
            q = np.ascontiguousarray(qkv[:, :H * d]).reshape(T, H, d)  # (T, H, d)
            k = qkv[:, H * d:(H + K) * d].reshape(T, K, d)  # (T, K, d)
            v = qkv[:, (H + K) * d:].reshape(T, K, d)  # (T, K, d)
        else:
            q = linear(x, layer.q_proj).reshape(T, H, d)  # (T, H, d)
            k = linear(x, layer.k_proj).reshape(T, K, d)  # (T, K, d)
            v = linear(x, layer.v_proj).reshape(T, K, d)  # (T, K, d)
        k = np.ascontiguousarray(k)
        ops.rope_inplace(q, cos, sin)
        ops.rope_inplace(k, cos, sin)
        out = np.empty_like(q)  # (T, H, d)
        for r0, n, cache in seqs:
            p = cache.length
            cache.k[i, p:p + n] = k[r0:r0 + n]
            cache.v[i, p:p + n] = v[r0:r0 + n]
            ops.attention(out[r0:r0 + n], q[r0:r0 + n], cache.k[i], cache.v[i], p, self.scale)
        return linear(out.reshape(T, -1), layer.o_proj)  # (T, D)

    def route(self, x: np.ndarray, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        """Softmax over experts, top-k, renormalised.  x: (T, D) → ids (T, A), weights (T, A)"""
        logits = linear(x, layer.gate)  # (T, E)
        T, A = x.shape[0], self.args.num_experts_per_tok
        ids = np.empty((T, A), dtype=np.int64)
        w = np.empty((T, A), dtype=np.float32)
        ops.route_topk(ids, w, logits)
        return ids, w

    def moe(self, h: np.ndarray, x: np.ndarray, layer: Layer, i: int) -> np.ndarray:
        """h: normalised input of layer i's experts; x: the residual stream, for next-layer prediction."""
        ids, w = self.route(h, layer)
        layers = self.weights.layers
        if self.experts.wants_hints and i + 1 < len(layers):
            # Layer i+1's router on the current hidden state predicts its experts (~70 % right on real models).
            nxt = layers[i + 1]
            self.experts.hint(i + 1, np.unique(self.route(rms_norm(x, nxt.post_attention_layernorm,
                                                                   self.args.rms_norm_eps), nxt)[0]))
        return switch_glu(h, ids, w, self.experts, i)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` (T,) at the next positions of `cache`; logits (T, V), or (1, V) of the last token."""
        ids = np.asarray(ids, dtype=np.int64)
        x = self._hidden(ids, [(0, ids.shape[0], cache)])  # (T, D)
        return self._logits(x if all_logits else x[-1:])

    def forward_batch(self, batch: list[tuple[np.ndarray, KVCache]]) -> np.ndarray:
        """One pass for several sequences: each (ids (T_j,), its cache) runs at its cache's next positions.

        Every token goes through the same per-row arithmetic as in `forward`, so a sequence's logits do
        not depend on what else is in the batch; experts are fetched and applied once for all rows.
        Returns the last-token logits of each sequence, (len(batch), V).
        """
        ids = [np.asarray(t, dtype=np.int64) for t, _ in batch]
        starts = np.cumsum([0] + [t.shape[0] for t in ids])
        seqs = [(int(starts[j]), t.shape[0], c) for j, (t, (_, c)) in enumerate(zip(ids, batch))]
        x = self._hidden(np.concatenate(ids), seqs)  # (T, D)
        return self._logits(x[starts[1:] - 1])

    def _hidden(self, ids: np.ndarray, seqs: list[tuple[int, int, KVCache]]) -> np.ndarray:
        """The last layer's output for `ids` (T,), whose rows r0..r0+n-1 continue each (r0, n, cache)."""
        a = self.args
        for _, n, cache in seqs:
            cache.reserve(n)
        if len({id(c) for *_, c in seqs}) != len(seqs):
            raise ValueError("forward_batch: a cache appears twice in one batch")
        positions = np.concatenate([np.arange(c.length, c.length + n) for _, n, c in seqs])  # (T,)
        T = ids.shape[0]
        cos = np.empty((T, a.head_dim // 2), dtype=np.float32)  # (T, d/2)
        sin = np.empty_like(cos)
        ops.rope_tables(cos, sin, positions, float(a.rope_theta), a.head_dim)
        x = self.embed_rows(ids)  # (T, D)
        for i, layer in enumerate(self.weights.layers):
            x = x + self.attention(rms_norm(x, layer.input_layernorm, a.rms_norm_eps), layer, i, seqs, cos, sin)
            x = x + self.moe(rms_norm(x, layer.post_attention_layernorm, a.rms_norm_eps), x, layer, i)
        for _, n, cache in seqs:  # only now: a failed pass leaves every cache as it was
            cache.length += n
        return x

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """(T, D) hidden states → (T, V) logits."""
        return linear(rms_norm(np.ascontiguousarray(x), self.weights.norm, self.args.rms_norm_eps),
                      self.weights.lm_head)
