"""Pre-allocated key/value cache for every layer: float32, half precision (IEEE f16 bits held in uint16) or ggml's
Q8_0 blocks (uint8, 34 bytes per 32 values). NumPy here and the kernels (kernels/kv_access.py) round the same way:
f16 to nearest with ties to even, Q8_0 as gguf.quants."""

from __future__ import annotations

import numpy as np

from .errors import ContextOverflowError, UsageError

CACHE_TYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.uint8}  # --cache-type → the arrays' dtype


def row_width(cache_type: str, head_dim: int) -> int:
    """Elements of the cache's dtype one position of one head takes."""
    return head_dim // 32 * 34 if cache_type == "q8_0" else head_dim


class KVCache:
    """Keys and values of every position seen so far, allocated once for the whole context."""

    def __init__(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int, cache_type: str = "f32"):
        if cache_type not in CACHE_TYPES:
            raise UsageError(f"unknown KV cache type {cache_type!r}; use one of {', '.join(CACHE_TYPES)}")
        if cache_type == "q8_0" and head_dim % 32:
            raise UsageError(f"a q8_0 KV cache needs a head size that is a multiple of 32, and this model's is "
                             f"{head_dim}; use --cache-type f16")
        self.n_ctx = n_ctx
        self.cache_type = cache_type
        self.head_dim = head_dim
        dtype, W = CACHE_TYPES[cache_type], row_width(cache_type, head_dim)
        # head-major: a head's positions follow each other, so attention reads them as one stream
        self.k = np.zeros((n_layers, n_kv_heads, n_ctx, W), dtype=dtype)  # (L, K, S, W): W = d, or q8_0 bytes
        self.v = np.zeros((n_layers, n_kv_heads, n_ctx, W), dtype=dtype)  # (L, K, S, W)
        self.length = 0  # positions filled

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Keys and values of positions pos .. pos+n-1 of `layer`, rounded to the cache's type.
        k, v: (n, K, d) float32"""
        n = k.shape[0]
        self.k[layer, :, pos:pos + n] = self._stored(k.transpose(1, 0, 2))  # (K, n, d)
        self.v[layer, :, pos:pos + n] = self._stored(v.transpose(1, 0, 2))

    def _stored(self, x: np.ndarray) -> np.ndarray:
        """x: (K, n, d) float32 → (K, n, W) in the cache's type"""
        if self.cache_type == "f32":
            return x
        if self.cache_type == "f16":
            return x.astype(np.float16).view(np.uint16)
        from gguf import GGMLQuantizationType

        from .quants import quantize

        return quantize(x, GGMLQuantizationType.Q8_0)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one position's keys and values over every layer."""
        L, K, _, W = self.k.shape
        return 2 * L * K * W * self.k.itemsize

    def load_prefix(self, k: np.ndarray, v: np.ndarray, n: int) -> None:
        """Start from positions 0..n-1 of another cache of the same model (prompt-prefix reuse).
        k, v: (L, K, >= n, d)"""
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3] or v.shape != k.shape or \
                k.dtype != self.k.dtype:
            raise ValueError(f"a KV prefix of shape {k.shape} does not fit a cache of shape {self.k.shape}")
        self.reserve(n - self.length)
        self.k[:, :, :n] = k[:, :, :n]
        self.v[:, :, :n] = v[:, :, :n]
        self.length = n

    def reserve(self, n_new: int) -> None:
        if self.length + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"{self.length + n_new} tokens do not fit the context of {self.n_ctx}; "
                "shorten the prompt or -n, or raise --ctx (up to the model's trained context)"
            )

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (rejected speculative tokens, a new prompt)."""
        self.length = min(self.length, length)
