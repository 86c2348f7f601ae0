"""Pre-allocated key/value cache for every layer."""

from __future__ import annotations

import numpy as np

from .errors import ContextOverflowError


class KVCache:
    """Keys and values of every position seen so far, allocated once for the whole context."""

    def __init__(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int):
        self.n_ctx = n_ctx
        # head-major: a head's positions follow each other, so attention reads them as one stream
        self.k = np.zeros((n_layers, n_kv_heads, n_ctx, head_dim), dtype=np.float32)  # (L, K, S, d)
        self.v = np.zeros((n_layers, n_kv_heads, n_ctx, head_dim), dtype=np.float32)  # (L, K, S, d)
        self.length = 0  # positions filled

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n_new: int) -> None:
        if self.length + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"{self.length + n_new} tokens do not fit the context of {self.n_ctx}; "
                "shorten the prompt or -n, or raise --ctx (up to the model's trained context)"
            )

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (rejected speculative tokens, a new prompt)."""
        self.length = min(self.length, length)
