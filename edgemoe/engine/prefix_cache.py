"""Prompt-prefix reuse: the KV rows of recent sequences, kept within a byte budget, copied into a new request's
cache for the longest token prefix it shares with one of them (llama-server's cache_prompt, vLLM's prefix
caching). The request then prefills only the rest of its prompt, and always at least its last token, whose
logits it needs.

Why a copy is exact: a K/V row at position p is a function of tokens 0..p alone (causal attention, RoPE at the
absolute position), and every kernel computes a row with the same bits however the rows are grouped into
passes — a whole prompt, chunks of any size, one token at a time, batched with other sequences, a speculative
verification pass (tests/test_batch.py, tests/test_prefix_cache.py). So the rows kept from an earlier
sequence are the rows a fresh prefill of the shared prefix would write, and the logits after them are
bit-identical too. Rows past a sequence's committed tokens (drafts a speculative pass wrote and then
rejected, a self-draft's rows) are never kept.

Copies rather than shared copy-on-write blocks: each request's KVCache is one pre-allocated array for its
whole context (kv_cache.py), and copying a prefix costs a memory copy (~4 KB per token on the default model,
256 KB on Mixtral 8x7B) against a forward pass per token.

Sources are the kept sequences (LRU by bytes within the budget) and the requests still running on the same
core (their committed rows), so a request that arrives while another with the same system prompt runs
reuses it too. One thread (the engine's) calls everything but `figures()`, which only reads counters.

Shapes: L = layers, K = KV heads, n = tokens kept, d = head dim.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..kv_cache import KVCache

log = logging.getLogger("edgemoe.engine")


@dataclass
class Entry:
    tokens: np.ndarray  # (n,) int64: the tokens whose rows these are, from position 0
    k: np.ndarray  # (L, K, n, d) float32
    v: np.ndarray  # (L, K, n, d) float32

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.k.nbytes + self.v.nbytes


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` (n,) and `b` (m,) share."""
    n = min(a.shape[0], b.shape[0])
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """KV rows of recent sequences by token prefix; `fill` at admission, `track`/`release` around a request."""

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError("PrefixCache needs a positive budget; pass no cache to disable reuse")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._next_key = 0
        self._running: dict[int, tuple[list[int], KVCache]] = {}  # request id → (its history, its cache)
        self.bytes = 0  # held by the entries
        self.hits = 0  # admissions that reused at least one row
        self.misses = 0
        self.reused_tokens = 0
        self.evictions = 0

    # ------------------------------------------------------------------ admission

    def fill(self, prompt_ids: list[int], cache: KVCache) -> int:
        """Copy into the empty `cache` the rows of the longest prefix of `prompt_ids` some source holds, at most
        all but the last prompt token; returns how many (0: nothing shared)."""
        assert cache.length == 0
        prompt = np.asarray(prompt_ids, dtype=np.int64)  # (T,)
        want = prompt.shape[0] - 1  # the last token always runs: its logits give the first reply token
        best, best_k, best_v, best_key = 0, None, None, None
        for key in reversed(self._entries):  # most recent first: it wins a tie
            e = self._entries[key]
            n = common_prefix(e.tokens, prompt[:want])
            if n > best:
                best, best_k, best_v, best_key = n, e.k, e.v, key
        for history, src in self._running.values():
            n = min(src.length, len(history), want)
            n = common_prefix(np.asarray(history[:n], dtype=np.int64), prompt[:n])
            if n > best:
                best, best_k, best_v, best_key = n, src.k, src.v, None
        if best == 0:
            self.misses += 1
            return 0
        cache.load_prefix(best_k, best_v, best)
        if best_key is not None:
            self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best

    def track(self, req_id: int, history: list[int], cache: KVCache) -> None:
        """A running request's committed rows (`history`, the list the engine appends to) are a source too."""
        self._running[req_id] = (history, cache)

    # ------------------------------------------------------------------ the end of a request

    def release(self, req_id: int, keep: bool) -> None:
        """The request ended: with `keep`, its committed rows join the cache (a failed one's are dropped)."""
        tracked = self._running.pop(req_id, None)
        if keep and tracked is not None:
            try:
                self.keep(*tracked)
            except MemoryError:  # keeping is an optimisation: the request still ends normally
                log.warning("the prompt cache could not copy a %d-token sequence: out of memory; lower "
                            "server.prompt_cache_mb", min(tracked[1].length, len(tracked[0])))

    def keep(self, tokens: list[int], cache: KVCache) -> None:
        """Keep the rows of the tokens `cache` holds, evicting the least recently used entries for room."""
        n = min(cache.length, len(tokens))  # past the committed tokens: rejected drafts; the last sampled
        need = n * (cache.row_bytes + 8)  # token was never run; + its token id
        if n == 0 or need > self.budget_bytes:
            return
        t = np.asarray(tokens[:n], dtype=np.int64)  # (n,)
        for key in list(self._entries):
            e = self._entries[key]
            shared = common_prefix(e.tokens, t)
            if shared == n:  # an entry already holds these rows (the same prompt again): it is used now
                self._entries.move_to_end(key)
                return
            if shared == e.tokens.shape[0]:  # the new sequence continues it (a conversation's next turn)
                self._drop(key)
        while self.bytes + need > self.budget_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        e = Entry(t, cache.k[:, :, :n].copy(), cache.v[:, :, :n].copy())  # (L, K, n, d) each
        self._entries[self._next_key] = e
        self._next_key += 1
        self.bytes += e.nbytes

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        """Forget every kept sequence (running requests stay sources)."""
        self._entries.clear()
        self.bytes = 0

    # ------------------------------------------------------------------ reporting

    def entries(self) -> list[Entry]:
        """The kept sequences, least recently used first."""
        return list(self._entries.values())

    def figures(self) -> dict:
        """Counters for /health and /metrics (read from another thread: plain numbers only)."""
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens,
                "evictions": self.evictions}
