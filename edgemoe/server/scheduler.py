"""Continuous-batching decisions: who waits, who runs, who is admitted next. No model, no threads.

Requests join and leave the running batch at every step. Waiting requests sit in one FIFO per priority
class; free batch slots are filled by smooth weighted round-robin over the classes that have someone
waiting (nginx's algorithm: deterministic, and with weights {a: 3, b: 1} it admits a, a, b, a, ...).

The scheduler only needs two attributes of a request: `priority` (a class name) and `cancelled` (set
when the client went away). It is not thread-safe: the engine calls it under its own lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already (HTTP 429)."""


class ShuttingDown(QueueFull):
    """The server is draining for shutdown and admits nothing new (HTTP 503)."""


class UnknownClass(ValueError):
    """A request names a priority class the `batching.admission` weights do not list (HTTP 400)."""


@dataclass
class Plan:
    """What one engine step does."""

    admitted: list[Any] = field(default_factory=list)  # to prefill now (already part of `running`)
    running: list[Any] = field(default_factory=list)  # every request that decodes a token this step
    dropped: list[Any] = field(default_factory=list)  # cancelled requests removed from queue or batch


class Scheduler:
    """Weighted round-robin admission into a batch of at most `max_batch`, with at most `max_queue` waiting."""

    def __init__(self, weights: Mapping[str, int], max_batch: int, max_queue: int):
        if not weights or any(int(w) < 1 for w in weights.values()):
            raise ValueError(f"admission weights must be positive integers, got {dict(weights)}")
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.weights = {str(k): int(w) for k, w in weights.items()}
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Requests that name no class: "default" if configured, else the heaviest class.
        self.default_class = "default" if "default" in self.weights else \
            min(self.weights, key=lambda c: (-self.weights[c], c))
        self._waiting: dict[str, deque] = {c: deque() for c in self.weights}
        self._credit = dict.fromkeys(self.weights, 0)  # smooth WRR "current weight" per class
        self.running: list[Any] = []
        self.admitting = True  # False once draining for shutdown

    @property
    def n_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def has_work(self) -> bool:
        return bool(self.running) or self.n_waiting > 0

    def submit(self, req: Any) -> None:
        """Queue `req`; raise UnknownClass for a class without a weight, QueueFull when the queue is full."""
        cls = req.priority if req.priority is not None else self.default_class
        if cls not in self._waiting:
            raise UnknownClass(f"unknown priority class {cls!r}; the server's classes are {sorted(self.weights)}")
        req.priority = cls
        if not self.admitting:
            raise ShuttingDown("the server is shutting down; retry once it is back")
        # Free batch slots count as room too: they are taken at the next step, not queued behind anyone.
        if self.n_waiting >= self.max_queue + max(0, self.max_batch - len(self.running)):
            raise QueueFull(f"{self.n_waiting} requests are waiting already (batching.max_queue); retry later")
        self._waiting[cls].append(req)

    def schedule(self) -> Plan:
        """Drop cancelled requests, fill free batch slots by weighted round-robin, and return the step's plan."""
        plan = Plan()
        plan.dropped = [r for r in self.running if r.cancelled]
        self.running = [r for r in self.running if not r.cancelled]
        for q in self._waiting.values():
            gone = [r for r in q if r.cancelled]
            if gone:
                plan.dropped += gone
                kept = [r for r in q if not r.cancelled]
                q.clear()
                q.extend(kept)
        while self.admitting and len(self.running) < self.max_batch:
            cls = self._next_class()
            if cls is None:
                break
            req = self._waiting[cls].popleft()
            self.running.append(req)
            plan.admitted.append(req)
        plan.running = list(self.running)
        return plan

    def _next_class(self) -> str | None:
        ready = [c for c, q in self._waiting.items() if q]
        if not ready:
            return None
        total = 0
        for c in ready:
            self._credit[c] += self.weights[c]
            total += self.weights[c]
        best = max(ready, key=lambda c: self._credit[c])  # first listed wins ties
        self._credit[best] -= total
        return best

    def finish(self, req: Any) -> None:
        """`req` is done (stop, length, error): it leaves the batch, freeing its slot for the next step."""
        self.running.remove(req)

    def drain(self) -> list[Any]:
        """Stop admitting; remove and return every waiting request (shutdown)."""
        self.admitting = False
        out = [r for q in self._waiting.values() for r in q]
        for q in self._waiting.values():
            q.clear()
        return out
