"""Service counters and their Prometheus text rendering (no client library needed for a dozen lines)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class Metrics:
    """Counters the engine thread updates and the HTTP side reads; one lock, cheap updates."""

    def __init__(self, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.window_s = window_s
        self.started = time.time()
        self.tokens_generated = 0
        self.prompt_tokens = 0  # prefilled: run through the model
        self.prompt_tokens_reused = 0  # copied from the prefix cache instead
        self.prompt_cache: Callable[[], dict] | None = None  # the engine's PrefixCache.figures, when it has one
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.requests = {"ok": 0, "cancelled": 0, "error": 0, "rejected": 0}
        self.queue_length = 0
        self.running = 0
        self.steps = 0
        self.draft_tokens = 0  # speculative tokens verified
        self.accepted_tokens = 0  # of which the target kept
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tok/s

    def step(self, n_tokens: int, decode_s: float, queue_length: int, running: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.tokens_generated += n_tokens
            self.decode_seconds += decode_s
            self.queue_length = queue_length
            self.running = running
            self._recent.append((now, n_tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def prefill(self, n_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += n_tokens
            self.prefill_seconds += seconds

    def prompt_reused(self, n_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens_reused += n_tokens

    def speculative(self, drafted: int, accepted: int) -> None:
        with self._lock:
            self.draft_tokens += drafted
            self.accepted_tokens += accepted

    def request_done(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window_s` seconds (all running requests together)."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - self.window_s]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def snapshot(self) -> dict:
        """The figures as a dict (for /health and the repl's /stats)."""
        with self._lock:
            snap = {"tokens_generated": self.tokens_generated, "prompt_tokens": self.prompt_tokens,
                    "prompt_tokens_reused": self.prompt_tokens_reused,
                    "prefill_seconds": round(self.prefill_seconds, 4), "decode_seconds": round(self.decode_seconds, 4),
                    "requests": dict(self.requests), "queue_length": self.queue_length,
                    "running": self.running, "steps": self.steps,
                    "speculative": {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                                    "acceptance_rate": round(self.accepted_tokens / self.draft_tokens, 4)
                                    if self.draft_tokens else 0.0}}
        if self.prompt_cache is not None:
            snap["prompt_cache"] = self.prompt_cache()
        snap["tokens_per_second"] = round(self.tokens_per_second(), 3)
        snap["uptime_seconds"] = round(time.time() - self.started, 1)
        return snap


def prometheus(snap: dict, cache: dict | None) -> str:
    """Prometheus text exposition of `Metrics.snapshot()` plus the expert cache figures when streaming."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP edgemoe_{name} {help_text}")
        lines.append(f"# TYPE edgemoe_{name} {kind}")
        lines.extend(f"edgemoe_{name}{labels} {value}" for labels, value in samples)

    metric("tokens_generated_total", "counter", "Tokens generated.", [("", snap["tokens_generated"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled (run through the model).",
           [("", snap["prompt_tokens"])])
    metric("prompt_tokens_reused_total", "counter", "Prompt tokens whose KV rows were copied from the prompt cache "
           "instead of prefilled.", [("", snap["prompt_tokens_reused"])])
    pc = snap.get("prompt_cache")
    if pc is not None:
        metric("prompt_cache_bytes", "gauge", "Bytes of KV rows the prompt cache holds.", [("", pc["bytes"])])
        metric("prompt_cache_entries", "gauge", "Sequences the prompt cache holds.", [("", pc["entries"])])
        metric("prompt_cache_evictions_total", "counter", "Sequences evicted from the prompt cache for room.",
               [("", pc["evictions"])])
    metric("prefill_seconds_total", "counter", "Seconds spent prefilling prompts.", [("", snap["prefill_seconds"])])
    metric("decode_seconds_total", "counter", "Seconds spent decoding.", [("", snap["decode_seconds"])])
    metric("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           [("", snap["tokens_per_second"])])
    metric("queue_length", "gauge", "Requests waiting for a batch slot.", [("", snap["queue_length"])])
    metric("running_batch_size", "gauge", "Requests in the running batch.", [("", snap["running"])])
    metric("requests_total", "counter", "Finished requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in sorted(snap["requests"].items())])
    metric("engine_steps_total", "counter", "Engine steps run.", [("", snap["steps"])])
    spec = snap["speculative"]
    metric("speculative_draft_tokens_total", "counter", "Draft tokens verified by the target model.",
           [("", spec["draft_tokens"])])
    metric("speculative_accepted_tokens_total", "counter", "Draft tokens the target model accepted.",
           [("", spec["accepted_tokens"])])
    if cache:
        metric("expert_cache_hit_rate", "gauge", "Expert cache hit rate.", [("", cache["hit_rate"])])
        metric("expert_cache_hits_total", "counter", "Expert cache hits.", [("", cache["hits"])])
        metric("expert_cache_misses_total", "counter", "Expert cache misses.", [("", cache["misses"])])
        metric("expert_bytes_read_total", "counter", "Bytes of experts read from disk.", [("", cache["bytes_read"])])
        metric("expert_read_retries_total", "counter", "Expert reads tried again after an I/O error or short read.",
               [("", cache["read_retries"])])
        metric("expert_reads_recovered_total", "counter", "Expert reads that succeeded after a retry.",
               [("", cache["recovered_reads"])])
        metric("expert_reads_failed_total", "counter", "Expert reads that failed every attempt.",
               [("", cache["failed_reads"])])
    return "\n".join(lines) + "\n"
