"""The forward pass of every MoE family: grouped-query attention with RoPE, and a sparse MoE of SwiGLU experts.

What differs between families (attention biases, q/k norms, clipping, routing renormalisation, a shared
expert) comes from the family's spec (models/arch.py, one file per family) and the ModelArgs it built.

Legend: T = tokens in the step, D = hidden_size, H = num_attention_heads, K = num_key_value_heads,
d = head_dim, E = num_local_experts, A = num_experts_per_tok, V = vocab_size, S = cache positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..experts.store import ExpertStore
from ..kernels import fused, ops
from ..kernels.attention_seqs import KVLists, attention_seqs
from ..kernels.layouts import interleave_if_eligible
from ..kv_cache import KVCache
from ..qtensor import QTensor
from .arch import spec_of
from .args import ModelArgs
from .base import expert_mlp, linear, rms_norm, switch_glu

DENSE = ("input_layernorm", "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "post_attention_layernorm", "gate",
         "q_bias", "k_bias", "v_bias", "qkv_bias", "o_bias", "q_norm", "k_norm", "shared_expert_gate")
# the dense tensors of a layer, besides a shared expert

FUSED_ROWS = 32  # steps of up to this many tokens run their blocks as one parallel region each (beyond, the
# batched matrix kernels reuse each weight block over more rows and win)


FUSED_ONE_TOKEN_EXPERTS = 8  # the one-token expert block is compiled per expert count (a tuple of matrices each);
# beyond this many routed experts a token runs the grouped block, whose compile does not grow with the count


@dataclass(frozen=True)
class DraftRouting:
    """How a self-draft pass cuts the target model down (engine/proposers.py): each router picks its top
    `experts_per_tok` among the experts already in RAM (renormalised), layers in `skip_layers` are left
    out, and nothing is read from disk or hinted for prefetching."""

    experts_per_tok: int = 1
    skip_layers: frozenset = frozenset()


@dataclass
class Layer:
    input_layernorm: np.ndarray  # (D,)
    q_proj: QTensor | None  # (H*d, D); None once stacked into qkv_proj
    k_proj: QTensor | None  # (K*d, D)
    v_proj: QTensor | None  # (K*d, D)
    o_proj: QTensor  # (D, H*d)
    post_attention_layernorm: np.ndarray  # (D,)
    gate: QTensor  # router (E, D)
    qkv_proj: QTensor | None = None  # ((H + 2K) d, D): q, k, v rows in one matrix (Model.prepare)
    q_bias: np.ndarray | None = None  # (H*d,) (Qwen2-MoE); None once stacked into qkv_bias
    k_bias: np.ndarray | None = None  # (K*d,)
    v_bias: np.ndarray | None = None  # (K*d,)
    qkv_bias: np.ndarray | None = None  # ((H + 2K) d,) with qkv_proj
    o_bias: np.ndarray | None = None  # (D,)
    q_norm: np.ndarray | None = None  # (d,) per head (Qwen3-MoE) or (H*d,) over all heads (OLMoE)
    k_norm: np.ndarray | None = None  # (d,) or (K*d,)
    shared_expert: object | None = None  # experts.store.Expert every token takes (Qwen2-MoE)
    shared_expert_gate: QTensor | None = None  # (1, D): the shared expert's output is scaled by sigmoid(gate · h)
    mlp: object | None = None  # a dense layer's SwiGLU MLP (experts.store.Expert), when `gate` (the router) is None
    extra: dict = field(default_factory=dict)  # a family's own tensors by part name (DeepSeek's latent attention)


@dataclass
class Weights:
    embed_tokens: QTensor  # (V, D)
    layers: list[Layer]
    norm: np.ndarray  # (D,)
    lm_head: QTensor  # (V, D); the embedding itself when tied


class Model:
    """The forward pass of a MoE family over a KV cache; experts come from an ExpertStore."""

    def __init__(self, args: ModelArgs, weights: Weights, experts: ExpertStore, embed_rows):
        self.args = args
        self.spec = spec_of(args)
        self._want = None  # the KV cache shape forward_batch checks callers' caches against
        self.weights = weights
        self.experts = experts
        self.embed_rows = embed_rows  # ids (T,) → (T, D) float32, dequantising only those rows
        scale = self.spec.softmax_scale(args) if self.spec.softmax_scale else 1.0 / math.sqrt(args.head_dim)
        self.scale = np.float32(scale)
        self.fused = True  # one-token steps run each layer's blocks as single kernels (kernels/fused.py)
        self.compile_wait = True  # False: a fused kernel not compiled yet compiles in the background (compile_ahead)
        self._compile_state: dict = {}  # compile_ahead's record of this model's fused kernels
        self.cache_type = "f16"  # KV caches new_cache() makes: "f16" or "f32" (kv_cache.CACHE_TYPES)
        self.layout = "plain dense, plain experts"  # set by prepare

    def _ahead(self) -> dict | None:
        """What the fused blocks take as `ahead`: None (compile before running) or this model's state."""
        return None if self.compile_wait else self._compile_state

    def dense_nbytes(self) -> int:
        """Bytes of the dense tensors a forward pass reads (all but the embedding, of which a step reads rows)."""
        w = self.weights
        total = w.norm.nbytes + w.lm_head.nbytes
        for layer in w.layers:
            total += sum(t.nbytes for t in (getattr(layer, n) for n in DENSE) if t is not None)
            for mx in (layer.shared_expert, layer.mlp):
                if mx is not None:
                    total += mx.gate.nbytes + mx.up.nbytes + mx.down.nbytes
            total += sum(t.nbytes for t in layer.extra.values())
        return total

    def prepare(self, own_dense: bool, repack_experts: bool, repack_dense: bool = True) -> None:
        """Lay the weights out for the kernels, once after loading.

        - q, k and v of a layer go into one matrix where they share a type (one kernel call for three);
        - matrices of the types in `kernels.layouts.X8` go into the 8-row interleaved layouts (kernels/q4x8.py, q4kx8.py,
          q8x8.py; 1.2-2.0x faster per core);
        - with `own_dense`, every other dense tensor a step reads is copied out of the memory-mapped file:
          when experts stream inside a memory limit the kernel reclaims clean file pages first, and a
          mapped norm or attention matrix would be faulted back in from the disk once per token;
        - with `repack_experts`, the experts take the interleaved layout too (a resident store copies them
          now, a streaming store repacks each as it arrives).
        `repack_dense` False keeps the dense matrices in the plain layout.
        """
        self.layout = ("interleaved" if repack_dense else "plain") + " dense, " + \
            ("interleaved" if repack_experts else "plain") + " experts"

        def laid_out(w):
            if isinstance(w, QTensor):
                if repack_dense:
                    w = interleave_if_eligible(w)
                if own_dense and not w.data.flags.owndata:
                    w = QTensor(np.array(w.data), w.qtype, w.rows, w.cols, w.interleave)
                return w
            w = np.array(w) if own_dense else w.view()
            w.flags.writeable = False  # like a memory map: one Numba type for every vector the kernels take
            return w

        for layer in self.weights.layers:
            q, k, v = layer.q_proj, layer.k_proj, layer.v_proj
            if k is not None and q.qtype == k.qtype == v.qtype and q.cols == k.cols == v.cols:
                layer.qkv_proj = QTensor(np.concatenate([q.data, k.data, v.data]), q.qtype,
                                         q.rows + k.rows + v.rows, q.cols)
                layer.q_proj = layer.k_proj = layer.v_proj = None
                if layer.q_bias is not None:
                    layer.qkv_bias = np.concatenate([layer.q_bias, layer.k_bias, layer.v_bias])
                    layer.q_bias = layer.k_bias = layer.v_bias = None
            for name in DENSE:
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, laid_out(t))
            for name in ("shared_expert", "mlp"):
                mx = getattr(layer, name)
                if mx is not None:
                    setattr(layer, name, type(mx)(laid_out(mx.gate), laid_out(mx.up), laid_out(mx.down)))
            layer.extra = {name: laid_out(t) if isinstance(t, QTensor) or t.ndim == 1 else t
                           for name, t in layer.extra.items()}
        self.weights.norm = laid_out(self.weights.norm)
        self.weights.lm_head = laid_out(self.weights.lm_head)  # the embedding lookup keeps its own plain copy
        if repack_experts:
            self.experts.repack_x8()

    def new_cache(self, n_ctx: int, cache_type: str | None = None) -> KVCache:
        """A KV cache for `n_ctx` positions, of `cache_type` (default: the model's `cache_type`: "f16", or what
        the session sets, --cache-type)."""
        a = self.args
        if self.spec.new_cache is not None:
            return self.spec.new_cache(a, n_ctx, cache_type or self.cache_type)
        return KVCache(a.num_hidden_layers, n_ctx, a.num_key_value_heads, a.head_dim, cache_type or self.cache_type)

    def attention(self, x: np.ndarray, layer: Layer, i: int, seqs: list[tuple[int, int, KVCache]],
                  cos, sin, kv: KVLists | None = None) -> np.ndarray:
        """Each sequence's tokens attend to its own cache.  x: (T, D); seqs: (start row, rows, cache) → (T, D)
        kv: the caches of several sequences as KVLists (their attention then runs as one parallel region)."""
        a = self.args
        T = x.shape[0]
        H, K, d = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        if layer.qkv_proj is not None:
            qkv = linear(x, layer.qkv_proj)  # (T, (H + 2K) d)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            q = np.ascontiguousarray(qkv[:, :H * d]).reshape(T, H, d)  # (T, H, d)
            k = qkv[:, H * d:(H + K) * d].reshape(T, K, d)  # (T, K, d)
            v = qkv[:, (H + K) * d:].reshape(T, K, d)  # (T, K, d)
        else:
            q, k, v = linear(x, layer.q_proj), linear(x, layer.k_proj), linear(x, layer.v_proj)
            if layer.q_bias is not None:
                q += layer.q_bias
                k += layer.k_bias
                v += layer.v_bias
            q, k, v = q.reshape(T, H, d), k.reshape(T, K, d), v.reshape(T, K, d)  # (T, H, d), (T, K, d) x2
        q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)
        extras = self._extras(layer, i)
        if extras[1].shape[0] or extras[3] > 0:  # the family's q/k norms, clamp (none: nothing to compile)
            ops.qk_inputs(q, k, v, extras[1], extras[2], a.rms_norm_eps, extras[3])
        ops.rope_inplace(q, cos, sin)
        ops.rope_inplace(k, cos, sin)
        out = np.empty_like(q)  # (T, H, d)
        for r0, n, cache in seqs:
            cache.write(i, cache.length, k[r0:r0 + n], v[r0:r0 + n])
        if kv is None or len(seqs) == 1:  # one sequence: one kernel call already
            for r0, n, cache in seqs:
                ops.attention(out[r0:r0 + n], q[r0:r0 + n], cache.k[i], cache.v[i], cache.length, self.scale,
                              extras[5], extras[6])
        else:
            attention_seqs(out, q, kv, i, self.scale, extras[5], extras[6])
        o = linear(out.reshape(T, -1), layer.o_proj)  # (T, D)
        if layer.o_bias is not None:
            o += layer.o_bias
        return o

    def _cache_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, row values) of this model's KV caches, worked out once (a one-position cache)."""
        if self._want is None:
            one = self.new_cache(1)
            self._want = (*one.k.shape[:2], one.head_dim)
        return self._want

    def _extras(self, layer: Layer, i: int) -> tuple:
        """(qkv_bias, q_norm, k_norm, clip, o_bias, sinks, window) of layer i's attention, empty arrays (window 0)
        for what it lacks."""
        sinks, window = self.spec.sinks_window(layer, i, self.args) if self.spec.sinks_window else (None, 0)
        return fused.attention_extras(layer.qkv_bias, layer.q_norm, layer.k_norm, self.args.clip_qkv, layer.o_bias,
                                      sinks, window)

    def route(self, x: np.ndarray, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        """Softmax over experts, top-k, renormalised when the family does.  x: (T, D) → ids (T, A), weights (T, A)"""
        if self.spec.route is not None:
            return self.spec.route(self, x, layer)
        logits = linear(x, layer.gate)  # (T, E)
        T, A = x.shape[0], self.args.num_experts_per_tok
        ids = np.empty((T, A), dtype=np.int64)
        w = np.empty((T, A), dtype=np.float32)
        ops.route_topk(ids, w, logits, self.args.norm_topk_prob)
        return ids, w

    def draft_route(self, x: np.ndarray, layer: Layer, i: int, draft: DraftRouting,
                    skipped: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Routing restricted to the experts in RAM: top `draft.experts_per_tok` of them, renormalised; None
        when no expert of the layer is in RAM. Adds to `skipped` (T,) the routing weight of the experts the
        full router would have used that are not in RAM.   x: (T, D) → ids (T, A'), weights (T, A')"""
        logits = linear(x, layer.gate)  # (T, E)
        resident = self.experts.resident(i)  # (E,) bool
        T = x.shape[0]
        if not resident.all():
            A = self.args.num_experts_per_tok
            ids, w = np.empty((T, A), np.int64), np.empty((T, A), np.float32)
            ops.route_topk(ids, w, logits, self.args.norm_topk_prob)
            skipped += np.where(resident[ids], 0.0, w).sum(axis=1)  # mass of the full routing left out
            logits = np.where(resident[None], logits, -np.inf).astype(np.float32)  # (T, E)
        n = min(draft.experts_per_tok, int(resident.sum()))
        if n == 0:
            return None
        ids, w = np.empty((T, n), np.int64), np.empty((T, n), np.float32)
        ops.route_topk(ids, w, logits, self.args.norm_topk_prob)
        return ids, w

    def moe(self, h: np.ndarray, x: np.ndarray, layer: Layer, i: int, draft=None) -> np.ndarray:
        """x plus layer i's experts applied to h, its normalised input (the routed ones, then a shared expert
        where the family has one).   x, h: (T, D) → (T, D)

        draft: (DraftRouting, skipped (T,)) for a self-draft pass, else None."""
        if layer.gate is None:  # a dense layer
            return x + expert_mlp(h, layer.mlp)
        out = self._routed(h, x, layer, i, draft)  # (T, D)
        if layer.shared_expert is not None:
            if layer.shared_expert_gate is None:  # DeepSeek: added as it is
                out += expert_mlp(h, layer.shared_expert)  # (T, D)
            else:
                z = linear(h, layer.shared_expert_gate)  # (T, 1)
                out += np.float32(1.0) / (np.float32(1.0) + np.exp(-z)) * expert_mlp(h, layer.shared_expert)  # (T, D)
        return out

    def _routed(self, h: np.ndarray, x: np.ndarray, layer: Layer, i: int, draft=None) -> np.ndarray:
        """x plus layer i's routed experts applied to h.   x, h: (T, D) → (T, D)"""
        experts = self.experts
        if draft is not None:
            routed = self.draft_route(h, layer, i, *draft)
            if routed is None:
                return x
            ids, w = routed
            experts = experts.in_ram()
        else:
            ids, w = self.route(h, layer)
        if draft is None and experts.wants_hints:
            self._predict(x, i)
        family = self.spec.moe_extras and self.spec.moe_extras(layer, self.args)  # gpt-oss's biases, clamp
        if self.fused and x.shape[0] == 1 and ids.shape[1] <= FUSED_ONE_TOKEN_EXPERTS:
            order = np.argsort(ids[0], kind="stable")  # summed in increasing expert id, as switch_glu
            experts.request(i, ids[0, order])
            chosen = [experts.get(i, int(e)) for e in ids[0, order]]
            kinds = fused.moe_kinds(chosen[0].gate_up, chosen[0].gate, chosen[0].down)
            out = kinds and fused.moe_block(x[0], h[0], chosen, np.ascontiguousarray(w[0, order]), kinds,
                                            self._ahead(), family and fused.moe_extras(family, ids[0, order]))
            if out is not None:
                return out[None]
        if self.fused and x.shape[0] <= FUSED_ROWS:
            fused_out = self._moe_rows(x, h, ids, w, experts, i, family)
            if fused_out is not None:
                return fused_out
        fn = self.spec.expert_fn
        return x + switch_glu(h, ids, w, experts, i, fn and (lambda v, ex, e: fn(v, ex, layer, e, self.args)))

    def _predict(self, x: np.ndarray, i: int) -> None:
        """Hint the experts of the next layers from the current hidden state x (T, D): layer i+d's router on
        x predicts its experts. The further ahead, the fewer are hinted — the top ceil(A / d) of each row, most
        likely first — since a prediction's accuracy falls with its depth and with its rank (one layer ahead
        70-87 % of first choices on the random and trained models measured, two layers ahead 56-78 %)."""
        layers = self.weights.layers
        for d in range(1, self.experts.hint_depth + 1):
            if i + d >= len(layers):
                return
            nxt = layers[i + d]
            if nxt.gate is None:  # a dense layer reads nothing
                continue
            ids = self.route(rms_norm(x, nxt.post_attention_layernorm, self.args.rms_norm_eps), nxt)[0]  # (T, A)
            ranked = ids[:, :-(-ids.shape[1] // d)].T.reshape(-1)  # rank-major: every row's first choice first
            self.experts.hint(i + d, list(dict.fromkeys(ranked.tolist())), d)

    def _moe_rows(self, x, h, ids, w, experts, i, family=None):
        """The fused expert block for a few tokens (verification passes, batched decode steps); None when the
        experts' kinds cannot run fused (or its kernel is still compiling).   x, h: (T, D); ids, w: (T, A) → (T, D)"""
        T, A = ids.shape
        order = np.argsort(ids, axis=1, kind="stable")  # (T, A): each token sums in increasing expert id
        sorted_ids = np.take_along_axis(ids, order, 1).reshape(-1)  # (S,)
        uniq, slot_exp = np.unique(sorted_ids, return_inverse=True)
        experts.request(i, uniq)  # a streaming store queues every missing read before the first compute
        chosen = [experts.get(i, int(e)) for e in uniq]
        kinds = fused.moe_kinds(chosen[0].gate_up, chosen[0].gate, chosen[0].down)
        if kinds is None:
            return None
        slot_w = np.ascontiguousarray(np.take_along_axis(w, order, 1).reshape(-1))  # (S,)
        slot_tok = np.repeat(np.arange(T, dtype=np.int64), A)  # (S,)
        tok_start = np.arange(T + 1, dtype=np.int64) * A  # (T + 1,)
        return fused.moe_rows_block(np.ascontiguousarray(x), np.ascontiguousarray(h), chosen, slot_w, slot_tok,
                                    slot_exp.astype(np.int64).reshape(-1), tok_start, kinds, self._ahead(),
                                    family and fused.moe_extras(family, uniq))

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` (T,) at the next positions of `cache`; logits (T, V), or (1, V) of the last token."""
        ids = np.asarray(ids, dtype=np.int64)
        x = self._hidden(ids, [(0, ids.shape[0], cache)])  # (T, D)
        return self._logits(x if all_logits else x[-1:])

    def forward_batch(self, batch: list[tuple[np.ndarray, KVCache]], rows: list[int] | None = None,
                      draft: DraftRouting | None = None, skipped: np.ndarray | None = None,
                      stop_above: float | None = None) -> np.ndarray | None:
        """One pass for several sequences: each (ids (T_j,), its cache) runs at its cache's next positions.

        Every token goes through the same per-row arithmetic as in `forward`, so a sequence's logits do
        not depend on what else is in the batch; experts are fetched and applied once for all rows.
        Returns the logits of the last rows[j] tokens of each sequence j (default 1), stacked in batch
        order: (sum(rows), V). A speculative step verifies its drafted tokens from those rows.
        draft: run as a self-draft (DraftRouting); `skipped` (T,) then receives, per token, the largest
        routing weight any layer had to leave out because its experts were not in RAM, and once every token
        has left out more than `stop_above` the pass stops early and returns None (the caches' lengths are
        then unchanged; positions it wrote are overwritten by the next pass).
        """
        ids = [np.asarray(t, dtype=np.int64) for t, _ in batch]
        starts = np.cumsum([0] + [t.shape[0] for t in ids])
        seqs = [(int(starts[j]), t.shape[0], c) for j, (t, (_, c)) in enumerate(zip(ids, batch))]
        x = self._hidden(np.concatenate(ids), seqs, draft, skipped, stop_above)  # (T, D)
        if x is None:
            return None
        if rows is None:
            return self._logits(x[starts[1:] - 1])
        pick = np.concatenate([np.arange(starts[j + 1] - r, starts[j + 1]) for j, r in enumerate(rows)])
        return self._logits(x[pick])

    def _hidden(self, ids: np.ndarray, seqs: list[tuple[int, int, KVCache]], draft: DraftRouting | None = None,
                skipped: np.ndarray | None = None, stop_above: float | None = None) -> np.ndarray | None:
        """The last layer's output for `ids` (T,), whose rows r0..r0+n-1 continue each (r0, n, cache)."""
        a = self.args
        for _, n, cache in seqs:
            cache.reserve(n)
        if len({id(c) for *_, c in seqs}) != len(seqs):
            raise ValueError("forward_batch: a cache appears twice in one batch")
        want = self._cache_shape()
        for *_, c in seqs:  # the kernels write into the cache unchecked: it must be this model's
            if (c.k.shape[0], c.k.shape[1], c.head_dim) != want:
                raise ValueError(f"forward_batch: a KV cache of shape {c.k.shape} is not this model's {want}")
        positions = np.concatenate([np.arange(c.length, c.length + n) for _, n, c in seqs])  # (T,)
        T = ids.shape[0]
        if self.spec.rope_tables is not None:
            cos, sin = self.spec.rope_tables(a, positions)
        else:
            cos = np.empty((T, a.head_dim // 2), dtype=np.float32)  # (T, d/2)
            sin = np.empty_like(cos)
            ops.rope_tables(cos, sin, positions, float(a.rope_theta), a.head_dim)
        x = self.embed_rows(ids)  # (T, D)
        kv = None  # the sequences' caches as the several-row attention kernels take them, made once per pass
        if T > 1 and self.spec.attention is None:
            kv = KVLists.of(seqs)
        fits = T <= FUSED_ROWS and self.fused  # the rows of one sequence, or of several, in one block
        plain = self.spec.fused_attention  # the fused blocks compute this family's attention
        for i, layer in enumerate(self.weights.layers):
            if draft is not None and i in draft.skip_layers:
                continue
            kinds = fits and plain and layer.qkv_proj is not None and fused.attention_kinds(layer.qkv_proj, layer.o_proj)
            out = None
            if kinds and T == 1:
                cache = seqs[0][2]
                out = fused.attention_block(x[0], layer.input_layernorm, a.rms_norm_eps, layer.qkv_proj,
                                            layer.o_proj, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                            cos, sin, cache.k[i], cache.v[i], cache.length, self.scale, kinds,
                                            self._extras(layer, i), self._ahead())
            elif kinds:
                out = fused.attention_seqs_block(x, layer.input_layernorm, a.rms_norm_eps, layer.qkv_proj,
                                                 layer.o_proj, a.num_attention_heads, a.num_key_value_heads,
                                                 a.head_dim, cos, sin, kv, i, self.scale, kinds,
                                                 self._extras(layer, i), self._ahead())
            if out is not None:
                x = out[None] if T == 1 else out
            else:
                if self.spec.attention is not None:
                    attend = lambda *args: self.spec.attention(self, *args[:-1])  # noqa: E731
                else:
                    attend = self.attention
                x = x + attend(rms_norm(x, layer.input_layernorm, a.rms_norm_eps), layer, i, seqs, cos, sin, kv)
            if draft is not None:
                layer_skip = np.zeros(T)  # (T,)
                x = self.moe(rms_norm(x, layer.post_attention_layernorm, a.rms_norm_eps), x, layer, i,
                             (draft, layer_skip))
                if skipped is not None:
                    np.maximum(skipped, layer_skip, out=skipped)
                    if stop_above is not None and skipped.min() > stop_above:
                        return None  # every token's draft already diverged: the rest would be wasted
            else:
                x = self.moe(rms_norm(x, layer.post_attention_layernorm, a.rms_norm_eps), x, layer, i)
        for _, n, cache in seqs:  # only now: a failed pass leaves every cache as it was
            cache.length += n
        return x

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """(T, D) hidden states → (T, V) logits."""
        return linear(rms_norm(np.ascontiguousarray(x), self.weights.norm, self.args.rms_norm_eps),
                      self.weights.lm_head)
