"""Eviction policies of the expert cache: which resident entry of a tier goes first.

Every key carries `Usage` (all its accesses, including those before an eviction); a policy keeps the
entries of one tier in eviction order and scores an entry for promotion into a hotter tier. Time is
counted in accesses (`ExpertCache.get` calls), not seconds, so replays and tests are deterministic.

- `lru`: evict the entry whose last access is oldest. Promotion score = access count.
- `lfu`: evict the entry with the fewest accesses ever, the least recently used among equals.
  Promotion score = access count.
- `temporal_lru` (the seed article's "access frequency weighted by recency"): an exponentially
  decayed access count with half-life `h` accesses,

      score(now) = sum over past accesses i of 2 ** (-(now - t_i) / h)

  kept incrementally as (d, t): on an access at `now`, d = d * 2 ** (-(now - t) / h) + 1, t = now,
  so score(now) = d * 2 ** (-(now - t) / h). An entry used often stays ahead of one used once even
  if that use was more recent; an entry that stops being used halves every `h` accesses and is
  forgotten. Large `h` tends to LFU, small `h` to LRU. Ordering two entries at the same `now`
  compares log2(d) + t / h, which does not change until the entry is touched again — that is what
  lets a heap with lazy invalidation keep the order in O(log n).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable

from ..errors import UsageError

POLICIES = ("temporal_lru", "lru", "lfu")


class Usage:
    """Access history of one key: count, last access time, decayed count at that time."""

    __slots__ = ("count", "tick", "decayed")

    def __init__(self, now: int):
        self.count = 1  # created by the key's first access
        self.tick = now
        self.decayed = 1.0

    def touch(self, now: int, half_life: float) -> None:
        self.decayed = self.decayed * 2.0 ** ((self.tick - now) / half_life) + 1.0
        self.count += 1
        self.tick = now


class LRUPolicy:
    """Least recently used: an OrderedDict in access order, O(1) per operation."""

    name = "lru"

    def __init__(self, half_life: float):
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def add(self, key: Hashable, usage: Usage) -> None:
        self._order[key] = None

    def touch(self, key: Hashable, usage: Usage) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def pop_victim(self) -> Hashable | None:
        """Remove and return the entry to evict, or None when the tier holds no evictable entry."""
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def score(self, usage: Usage, now: int) -> float:
        return float(usage.count)

    def peek_victim(self) -> Hashable | None:
        """The entry `pop_victim` would return, left in place."""
        return next(iter(self._order), None)


class _HeapPolicy:
    """Min-heap of (rank, key) with lazy invalidation: a touch pushes a new rank and the old heap item
    goes stale; stale items are skipped when popped and purged when they outnumber live ones."""

    name = ""

    def __init__(self, half_life: float):
        self.half_life = half_life
        self._rank: dict[Hashable, tuple] = {}  # key -> its current rank
        self._heap: list[tuple] = []  # (rank, seq, key); seq breaks ties without comparing keys
        self._seq = 0

    def __len__(self) -> int:
        return len(self._rank)

    def rank(self, usage: Usage) -> tuple:
        raise NotImplementedError

    def add(self, key: Hashable, usage: Usage) -> None:
        r = self.rank(usage)
        self._rank[key] = r
        self._seq += 1
        heapq.heappush(self._heap, (r, self._seq, key))
        if len(self._heap) > 2 * len(self._rank) + 64:
            self._heap = [item for item in self._heap if self._rank.get(item[2]) == item[0]]
            heapq.heapify(self._heap)

    touch = add

    def remove(self, key: Hashable) -> None:
        del self._rank[key]

    def pop_victim(self) -> Hashable | None:
        """Remove and return the entry to evict, or None when the tier holds no evictable entry."""
        key = self.peek_victim()
        if key is not None:
            heapq.heappop(self._heap)
            del self._rank[key]
        return key

    def peek_victim(self) -> Hashable | None:
        """The entry `pop_victim` would return, left in place (stale heap items above it are dropped)."""
        heap, ranks = self._heap, self._rank
        while heap:
            r, _, key = heap[0]
            if ranks.get(key) == r:
                return key
            heapq.heappop(heap)
        return None


class LFUPolicy(_HeapPolicy):
    """Least frequently used; among equal counts the least recently used goes first."""

    name = "lfu"

    def rank(self, usage: Usage) -> tuple:
        return (usage.count, usage.tick)

    def score(self, usage: Usage, now: int) -> float:
        return float(usage.count)


class TemporalLRUPolicy(_HeapPolicy):
    """Exponentially decayed access count (see the module docstring); older last access loses ties."""

    name = "temporal_lru"

    def rank(self, usage: Usage) -> tuple:
        return (math.log2(usage.decayed) + usage.tick / self.half_life, usage.tick)

    def score(self, usage: Usage, now: int) -> float:
        return usage.decayed * 2.0 ** ((usage.tick - now) / self.half_life)


def decayed(usage: Usage, now: int, half_life: float, before_last: bool = False) -> float:
    """The temporal score at `now` (see the module docstring) whatever a tier's policy; `before_last`: without
    the key's latest access. The cache's admission rule compares a newcomer's history with a victim's by it."""
    return (usage.decayed - before_last) * 2.0 ** ((usage.tick - now) / half_life)


_CLASSES = {"lru": LRUPolicy, "lfu": LFUPolicy, "temporal_lru": TemporalLRUPolicy}


def make_policy(name: str, half_life: float):
    """A fresh policy object for one tier; `half_life` (accesses) is used by temporal_lru only."""
    if name not in _CLASSES:
        raise UsageError(f"unknown cache policy {name!r}; use one of {', '.join(POLICIES)}")
    return _CLASSES[name](half_life)
