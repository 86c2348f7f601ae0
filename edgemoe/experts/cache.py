"""RAM cache of expert blobs: tiers with hard byte budgets, eviction policies, pinned layers, counters.

Keys are `(layer, expert)`; values are the expert's bytes (np.uint8, 1-D, read-only), copied once into
memory the cache owns. Every get() is an access of its key, hit or miss, and a key's access history
outlives its eviction (one small record per expert of the model): a decoder sweeps every layer once
per token, so without that history a re-read popular expert would look as new as a cold one.

Tiers are listed hottest first (normally hot, warm). New entries enter the coldest tier; an entry
whose policy score (see policies.py) reaches the next hotter tier's `pin_threshold` on a hit moves
up one tier (an insert whose history already scores that high goes straight there); a tier that
must make room demotes its victim one tier down if it fits there, and the coldest tier drops it.
Entries of `pin_layers` are never evicted.

Admission: a new entry that would push an entry out of the cache (its tier must make room and the coldest
tier is full) is cached only if its history before this access has a higher decayed access count (temporal_lru's score,
whatever the tiers' policies) than the coldest tier's victim — TinyLFU's rule; otherwise the caller uses it
once and it is not kept. A batch of tokens sweeps nearly
every expert of every layer in order each step, and a cache smaller than the sweep then evicts each
entry just before its next use (no hits at all); with admission the cache keeps a share of the experts
through the sweep, as the offline optimum does (`tools/replay_cache.py --batch`).

Memory: one anonymous mmap (the arena) of the tiers' summed capacities, carved by a best-fit free
list; tiers are byte budgets over it, so moving an entry between tiers copies nothing and the view a
caller holds stays valid. With equal-size experts (or `slot_bytes`) every hole fits the next blob,
so an insert that fits its tier's budget always finds memory.

Views and eviction: `get`/`put` return views into the arena. The memory of an evicted entry is
reused only once no array refers to it any more (its reference count is back to the cache's own),
so an expert the engine is computing with cannot be overwritten by a prefetch thread's insert.
While a caller holds views of evicted entries, inserts may fail for lack of memory (None, counted).

Threads: one lock guards the bookkeeping; the copy into the arena happens outside it, so an engine
thread's `get` does not wait behind a prefetch thread copying a 100 MB expert.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .arena import Arena
from .policies import Usage, decayed, make_policy

Key = tuple[int, int]  # (layer, expert)
HITS, MISSES, EVICTIONS, BYTES_INSERTED, REJECTED = range(5)  # per-layer counter slots
_COUNTERS = ("hits", "misses", "evictions", "bytes_inserted", "rejected")


@dataclass(frozen=True)
class TierSpec:
    """One RAM tier. `pin_threshold`: score an entry of the next colder tier must reach on a hit to be
    promoted into this tier (None: nothing is promoted into it)."""

    name: str
    capacity_bytes: int
    policy: str = "temporal_lru"
    pin_threshold: float | None = None


class _Tier:
    __slots__ = ("name", "capacity", "policy", "pin_threshold", "used", "locked", "resident", "entries", "hits")

    def __init__(self, spec: TierSpec, half_life: float):
        self.name = spec.name
        self.capacity = spec.capacity_bytes
        self.policy = make_policy(spec.policy, half_life)
        self.pin_threshold = spec.pin_threshold
        self.used = 0  # arena bytes charged to this tier (resident + inserts being copied)
        self.locked = 0  # of which not evictable: pinned entries and inserts being copied
        self.resident = 0  # blob bytes of resident entries (<= used <= capacity)
        self.entries = 0
        self.hits = 0


class _Entry:
    __slots__ = ("key", "arr", "off", "size", "nbytes", "tier", "usage", "pinned", "base_refs")

    def __init__(self, key: Key, off: int, size: int, nbytes: int, tier: int, usage: Usage, pinned: bool):
        self.key, self.off, self.size, self.nbytes = key, off, size, nbytes
        self.tier, self.usage, self.pinned = tier, usage, pinned
        self.arr: np.ndarray | None = None
        self.base_refs = 0


def _refs(e: _Entry) -> int:
    # Derived views (slices, reshapes, QTensor data) keep `e.arr` itself as their numpy base.
    return sys.getrefcount(e.arr)


def _as_u8(blob) -> np.ndarray:
    if isinstance(blob, np.ndarray):
        if not blob.flags.c_contiguous:
            raise ValueError("an expert blob must be C-contiguous")
        return blob.reshape(-1).view(np.uint8)
    return np.frombuffer(blob, np.uint8)  # bytes, bytearray, memoryview, mmap


class ExpertCache:
    """Budgeted RAM tiers of expert blobs keyed by (layer, expert); see the module docstring.

    tiers: hottest first. pin_layers: layers whose entries are never evicted (they count against the
    budget). half_life: temporal_lru half-life in accesses (get calls; a decoder makes
    layers x top_k of them per token, so 1024 is 16 tokens of a 32-layer top-2 model).
    slot_bytes: if set, every entry takes exactly this many bytes (blobs larger are not cached), which
    rules out fragmentation when expert sizes differ slightly. align: allocation granularity.
    """

    def __init__(
        self,
        tiers: list[TierSpec],
        pin_layers=(),
        *,
        half_life: float = 1024.0,
        slot_bytes: int | None = None,
        align: int = 64,
        admission: bool = True,
    ):
        if not tiers:
            raise UsageError("the expert cache needs at least one tier")
        if len({t.name for t in tiers}) != len(tiers):
            raise UsageError("cache tier names must be unique")
        for t in tiers:
            if int(t.capacity_bytes) != t.capacity_bytes or t.capacity_bytes < 0:
                raise UsageError(f"cache tier {t.name!r}: capacity must be a whole number of bytes >= 0")
        if not half_life > 0:
            raise UsageError(f"cache half_life must be > 0 accesses, got {half_life}")
        if align < 1 or align & (align - 1):
            raise UsageError(f"cache align must be a power of two, got {align}")
        if slot_bytes is not None and slot_bytes < 1:
            raise UsageError(f"cache slot_bytes must be >= 1, got {slot_bytes}")
        self._align = align
        self._admission = admission
        self._slot = None if slot_bytes is None else -(-slot_bytes // align) * align
        unit = self._slot or align
        self._tiers = [_Tier(t, float(half_life)) for t in tiers]
        self._arena = Arena(sum(t.capacity_bytes // unit * unit for t in tiers))
        self._half_life = float(half_life)
        self._pin_layers = frozenset(int(x) for x in pin_layers)
        self._entries: dict[Key, _Entry] = {}
        self._usage: dict[Key, Usage] = {}  # access history of every key seen, evicted ones too
        self._pending: dict[Key, _Entry] = {}  # reserved, being copied by put()
        self._draining: list[_Entry] = []  # evicted but still referenced by a caller's view
        self._lock = threading.Lock()
        self._clock = 0  # accesses so far: the time unit of temporal_lru
        self.reset_stats()

    # -- lookups -----------------------------------------------------------------------------------

    def get(self, key: Key) -> np.ndarray | None:
        """The cached blob (a read-only view) or None; records a hit or a miss for the key's layer."""
        with self._lock:
            self._clock += 1
            usage = self._usage.get(key)
            if usage is None:
                usage = self._usage[key] = Usage(self._clock)
            else:
                usage.touch(self._clock, self._half_life)
            e = self._entries.get(key)
            counts = self._layer(key[0])
            if e is None:
                counts[MISSES] += 1
                return None
            counts[HITS] += 1
            tier = self._tiers[e.tier]
            tier.hits += 1
            if not e.pinned:
                tier.policy.touch(key, e.usage)
            if e.tier > 0:
                self._maybe_promote(e)
            return e.arr

    def peek(self, key: Key) -> np.ndarray | None:
        """The cached blob or None, with no counter, usage or policy change (self-drafting reads)."""
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.arr

    def contains(self, key: Key) -> bool:
        """Whether `key` is resident (no counters change)."""
        return key in self._entries

    def tier_of(self, key: Key) -> str | None:
        """Name of the tier holding `key`, or None (no counters change)."""
        e = self._entries.get(key)
        return None if e is None else self._tiers[e.tier].name

    @property
    def capacity_bytes(self) -> int:
        """The tiers' budgets together."""
        return sum(t.capacity for t in self._tiers)

    @property
    def resident_bytes(self) -> int:
        """Blob bytes of all resident entries."""
        return sum(t.resident for t in self._tiers)

    def __len__(self) -> int:
        return len(self._entries)

    # -- inserts -----------------------------------------------------------------------------------

    def put(self, key: Key, blob) -> np.ndarray | None:
        """Copy `blob` (any C-contiguous buffer) into the cache, evicting as needed.

        Returns the cached read-only view, the existing one if `key` is already resident, or None when
        it is not cached: larger than the tier, the tier is full of pinned entries, memory is held by
        callers' views of evicted entries, or another thread is inserting the same key right now.
        """
        src = _as_u8(blob)

        def copy(dst: np.ndarray) -> None:
            dst[:] = src

        return self.put_with(key, src.nbytes, copy)

    def put_with(self, key: Key, nbytes: int, fill) -> np.ndarray | None:
        """As `put`, for `nbytes` that `fill(dst)` writes straight into the cache's uint8 view `dst`."""
        layer = key[0]
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                return e.arr
            if key in self._pending:
                return None
            e = self._reserve(key, nbytes, layer in self._pin_layers)
            if e is None:
                self._layer(layer)[REJECTED] += 1
                return None
            self._pending[key] = e
        try:
            fill(self._arena.view(e.off, e.nbytes))  # outside the lock: may be 100 MB
        except BaseException:
            with self._lock:  # give the reservation back
                del self._pending[key]
                tier = self._tiers[e.tier]
                tier.used -= e.size
                tier.locked -= e.size
                self._arena.free(e.off, e.size)
            raise
        with self._lock:
            del self._pending[key]
            e.arr = self._arena.view(e.off, e.nbytes)
            e.arr.flags.writeable = False
            e.base_refs = _refs(e)
            tier = self._tiers[e.tier]
            if not e.pinned:
                tier.locked -= e.size
                tier.policy.add(key, e.usage)
            tier.resident += e.nbytes
            tier.entries += 1
            self._entries[key] = e
            self._layer(layer)[BYTES_INSERTED] += e.nbytes
            self._inserts += 1
            return e.arr

    def clear(self) -> None:
        """Drop every entry, pinned ones too, and the access history (counters are kept; inserts in
        progress still land)."""
        with self._lock:
            for e in list(self._entries.values()):
                self._drop(e, count=False)
            self._usage = {k: e.usage for k, e in self._pending.items()}

    # -- stats -------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero every counter (entries stay)."""
        with self._lock:
            self._layers: dict[int, list[int]] = {}
            self._inserts = self._promotions = self._demotions = 0
            self._rejected_too_large = self._rejected_no_space = self._rejected_admission = 0
            for t in self._tiers:
                t.hits = 0

    def stats(self) -> dict:
        """Counters per layer and in total (with hit_rate), and occupancy per tier."""
        with self._lock:
            layers = {}
            totals = dict.fromkeys(_COUNTERS, 0)
            for layer in sorted(self._layers):
                c = self._layers[layer]
                row = dict(zip(_COUNTERS, c))
                row["hit_rate"] = c[HITS] / max(1, c[HITS] + c[MISSES])
                layers[layer] = row
                for name, v in zip(_COUNTERS, c):
                    totals[name] += v
            gets = totals["hits"] + totals["misses"]
            tiers = {
                t.name: {
                    "capacity_bytes": t.capacity,
                    "resident_bytes": t.resident,
                    "charged_bytes": t.used,
                    "entries": t.entries,
                    "hits": t.hits,
                    "policy": t.policy.name,
                }
                for t in self._tiers
            }
            return {
                **totals,
                "gets": gets,
                "hit_rate": totals["hits"] / max(1, gets),
                "inserts": self._inserts,
                "promotions": self._promotions,
                "demotions": self._demotions,
                "rejected_too_large": self._rejected_too_large,
                "rejected_no_space": self._rejected_no_space,
                "rejected_admission": self._rejected_admission,
                "entries": len(self._entries),
                "resident_bytes": sum(t.resident for t in self._tiers),
                "arena_bytes": self._arena.size,
                "draining_bytes": sum(e.nbytes for e in self._draining),
                "tiers": tiers,
                "layers": layers,
            }

    # -- internals (called with the lock held) -------------------------------------------------------

    def _layer(self, layer: int) -> list[int]:
        c = self._layers.get(layer)
        if c is None:
            c = self._layers[layer] = [0, 0, 0, 0, 0]
        return c

    def _alloc_size(self, nbytes: int) -> int:
        if self._slot is not None:
            return self._slot if nbytes <= self._slot else -1
        return max(1, -(-nbytes // self._align)) * self._align

    def _reserve(self, key: Key, nbytes: int, pinned: bool) -> _Entry | None:
        """Charge an insert to a tier and find it memory, evicting as needed.

        The coldest tier takes it, unless the key's history already scores the next hotter tier's
        pin_threshold (an expert re-read after eviction): then that tier does, as a hit would promote it.
        """
        usage = self._usage.get(key)
        if usage is None:  # inserted without a get (a prefetch): the insert is its first access
            usage = self._usage[key] = Usage(self._clock)
        cold = len(self._tiers) - 1
        size = self._alloc_size(nbytes)
        if size < 0 or size > self._tiers[cold].capacity:
            self._rejected_too_large += 1
            return None
        t = cold
        if cold > 0:
            up = self._tiers[cold - 1]
            if (
                up.pin_threshold is not None
                and size <= up.capacity - up.locked
                and up.policy.score(usage, self._clock) >= up.pin_threshold
            ):
                t = cold - 1
        tier = self._tiers[t]
        if size > tier.capacity - tier.locked:
            self._rejected_no_space += 1
            return None
        if not pinned and tier.used + size > tier.capacity and not self._admits(usage, size):
            self._rejected_admission += 1
            return None
        self._make_room(t, size)
        off = self._arena.alloc(size)
        while off is None:  # fragmented arena, or memory still held by callers' views of evicted entries
            self._sweep()
            off = self._arena.alloc(size)
            if off is not None:
                break
            victim = self._tiers[cold].policy.pop_victim()
            if victim is None:
                self._rejected_no_space += 1
                return None
            self._drop(self._entries[victim], count=True, in_policy=False)
            off = self._arena.alloc(size)
        tier.used += size
        tier.locked += size
        return _Entry(key, off, size, nbytes, t, usage, pinned)

    def _admits(self, usage: Usage, size: int) -> bool:
        """Whether a newcomer with `usage` may push an entry out of the cache: the coldest tier's victim, when
        that tier is full (an entry evicted from a hotter tier moves down into it). See the module docstring."""
        cold = self._tiers[-1]
        if not self._admission or cold.used + size <= cold.capacity:
            return True
        victim = cold.policy.peek_victim()
        if victim is None:
            return True
        now, h = self._clock, self._half_life
        return decayed(usage, now, h, before_last=True) > decayed(self._entries[victim].usage, now, h)

    def _make_room(self, t: int, size: int) -> None:
        """Evict tier t's victims until `size` more bytes fit its budget (the caller checked it can)."""
        tier = self._tiers[t]
        while tier.used + size > tier.capacity:
            victim = tier.policy.pop_victim()
            assert victim is not None, "tier budget check let an impossible insert through"
            e = self._entries[victim]
            self._leave_tier(e)
            if t + 1 < len(self._tiers) and self._enter_tier(e, t + 1):
                self._demotions += 1
            else:
                self._free(e, count=True)

    def _maybe_promote(self, e: _Entry) -> None:
        up = self._tiers[e.tier - 1]
        if up.pin_threshold is None or e.size > up.capacity - up.locked:
            return
        if up.policy.score(e.usage, self._clock) < up.pin_threshold:
            return
        if not e.pinned:
            self._tiers[e.tier].policy.remove(e.key)
        self._leave_tier(e)
        ok = self._enter_tier(e, e.tier - 1)
        assert ok
        self._promotions += 1

    def _leave_tier(self, e: _Entry) -> None:
        """Uncharge e from its tier (its policy entry is already gone)."""
        tier = self._tiers[e.tier]
        tier.used -= e.size
        tier.resident -= e.nbytes
        tier.entries -= 1
        if e.pinned:
            tier.locked -= e.size

    def _enter_tier(self, e: _Entry, t: int) -> bool:
        """Charge e to tier t, making room there; False (nothing changed) if it cannot fit."""
        tier = self._tiers[t]
        if e.size > tier.capacity - tier.locked:
            return False
        self._make_room(t, e.size)
        e.tier = t
        tier.used += e.size
        tier.resident += e.nbytes
        tier.entries += 1
        if e.pinned:
            tier.locked += e.size
        else:
            tier.policy.add(e.key, e.usage)
        return True

    def _drop(self, e: _Entry, *, count: bool, in_policy: bool = True) -> None:
        if in_policy and not e.pinned:
            self._tiers[e.tier].policy.remove(e.key)
        self._leave_tier(e)
        self._free(e, count=count)

    def _free(self, e: _Entry, *, count: bool) -> None:
        """Forget e (already uncharged); its memory is reused once no caller's view refers to it."""
        del self._entries[e.key]
        if count:
            self._layer(e.key[0])[EVICTIONS] += 1
        if _refs(e) > e.base_refs:
            self._draining.append(e)
        else:
            self._arena.free(e.off, e.size)
            e.arr = None

    def _sweep(self) -> None:
        still = []
        for e in self._draining:
            if _refs(e) > e.base_refs:
                still.append(e)
            else:
                self._arena.free(e.off, e.size)
                e.arr = None
        self._draining = still
