"""ExpertCache: hard budgets under random workloads, each policy against a reference model written here
from its definition, promotion/demotion, pinning, counters, and the bytes behind returned views."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgemoe.errors import UsageError
from edgemoe.experts.cache import ExpertCache, TierSpec

U = 64  # bytes per test blob unit = the cache's default allocation granularity


def blob(key, n=U) -> np.ndarray:
    """Deterministic content per (key, size), so a wrong or overwritten view is detectable."""
    return np.random.default_rng([key[0], key[1], n]).integers(0, 256, n, dtype=np.uint8)


def one_tier(policy, slots, **kw) -> ExpertCache:
    """A cache whose eviction order is under test: no admission rule (test_admission_* cover it)."""
    return ExpertCache([TierSpec("warm", slots * U, policy)], **{"admission": False, **kw})


# -- reference policies, straight from the definitions ---------------------------------------------


def ref_replay(policy, slots, trace, half_life=8.0):
    """Yield (hit, resident set) per access of a cache of `slots` equal blobs. Time = number of gets;
    every get is an access, remembered after eviction too; a miss inserts, evicting first if full."""

    def rank(times, now):
        if policy == "lru":
            return (times[-1],)
        if policy == "lfu":
            return (len(times), times[-1])
        return (sum(2.0 ** (-(now - t) / half_life) for t in times), times[-1])

    hist: dict = {}  # key -> times of all its accesses
    resident: set = set()
    for now, key in enumerate(trace, start=1):
        hist.setdefault(key, []).append(now)
        hit = key in resident
        if not hit and len(resident) == slots:
            resident.remove(min(resident, key=lambda k, now=now: rank(hist[k], now)))
        resident.add(key)
        yield hit, set(resident)


def skewed_trace(rng, n, universe=12):
    return [(int(x) % 3, int(x) // 3) for x in np.minimum(rng.zipf(1.4, n) - 1, universe - 1)]


@pytest.mark.parametrize("policy", ["lru", "lfu", "temporal_lru"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_matches_reference(policy, seed):
    rng = np.random.default_rng(seed)
    trace = skewed_trace(rng, 1500) + [(int(k) % 3, int(k) // 3) for k in rng.integers(0, 12, 500)]
    cache = one_tier(policy, 4, half_life=8.0)
    for step, (key, (ref_hit, ref_set)) in enumerate(zip(trace, ref_replay(policy, 4, trace))):
        got = cache.get(key)
        assert (got is not None) == ref_hit, f"step {step}"
        if got is None:
            assert cache.put(key, blob(key)) is not None
        assert {k for k in ref_set if cache.contains(k)} == ref_set, f"step {step}"
        assert len(cache) == len(ref_set)


def test_lru_and_lfu_pick_different_victims():
    for policy, victim in (("lru", (0, 0)), ("lfu", (0, 1))):
        cache = one_tier(policy, 2)
        cache.put((0, 0), blob((0, 0)))
        cache.get((0, 0))
        cache.get((0, 0))  # (0, 0): 3 accesses, least recent
        cache.put((0, 1), blob((0, 1)))  # (0, 1): 1 access, most recent
        cache.put((0, 2), blob((0, 2)))
        assert not cache.contains(victim) and cache.contains((0, 2)), policy


def test_temporal_keeps_frequent_old_entry_then_forgets_it():
    cache = one_tier("temporal_lru", 3, half_life=4.0)
    a, b, c, d = (0, 0), (0, 1), (0, 2), (0, 3)
    cache.put(a, blob(a))
    for _ in range(9):
        assert cache.get(a) is not None
    cache.put(b, blob(b))  # used once, after a's last use
    cache.put(c, blob(c))
    cache.get(c)
    cache.put(d, blob(d))  # full: b (once, recent) goes, not a (often, older)
    assert cache.contains(a) and not cache.contains(b)
    for _ in range(30):  # a is no longer used: ~7 half-lives pass while c and d are used
        cache.get(c)
        cache.get(d)
    e = (0, 4)
    cache.put(e, blob(e))
    assert not cache.contains(a) and cache.contains(c) and cache.contains(d)


# -- tiers -----------------------------------------------------------------------------------------


def test_promotion_and_demotion_lru():
    cache = ExpertCache([TierSpec("hot", 2 * U, "lru", pin_threshold=2), TierSpec("warm", 2 * U, "lru")], admission=False)
    a, b, c = (0, 0), (0, 1), (0, 2)
    for k in (a, b, c):
        cache.put(k, blob(k))
        assert cache.tier_of(k) == "warm"
        assert cache.get(k) is not None  # second access: count 2 reaches the threshold
        assert cache.tier_of(k) == "hot" or k == c
    assert cache.tier_of(c) == "hot" and cache.tier_of(a) == "warm" and cache.tier_of(b) == "hot"
    s = cache.stats()
    assert (s["promotions"], s["demotions"], s["evictions"]) == (3, 1, 0)
    assert s["tiers"]["hot"]["resident_bytes"] == 2 * U and s["tiers"]["warm"]["resident_bytes"] == U
    np.testing.assert_array_equal(cache.get(a), blob(a))  # a promoted back, b (LRU in hot) demoted
    assert cache.tier_of(a) == "hot" and cache.tier_of(b) == "warm"


def test_hot_victim_dropped_when_warm_is_full_of_pinned():
    cache = ExpertCache([TierSpec("hot", 2 * U, "lru", pin_threshold=2), TierSpec("warm", 3 * U, "lru")], pin_layers=(9,),
                        admission=False)
    a = (0, 0)
    cache.put(a, blob(a, 2 * U))
    cache.get(a)
    assert cache.tier_of(a) == "hot"
    pins = [(9, i) for i in range(3)]
    for p in pins:
        assert cache.put(p, blob(p)) is not None
    assert cache.put((1, 0), blob((1, 0))) is None  # warm is full of pinned entries
    cache.get(pins[0])  # promoted: hot must make room, and a (2 units) cannot fit warm's 1 free unit
    assert cache.tier_of(pins[0]) == "hot" and not cache.contains(a)
    s = cache.stats()
    assert s["layers"][0]["evictions"] == 1 and s["layers"][1]["rejected"] == 1 and s["demotions"] == 0


def test_temporal_promotion_needs_recent_reuse():
    cache = ExpertCache(
        [TierSpec("hot", 4 * U, "temporal_lru", pin_threshold=1.5), TierSpec("warm", 4 * U, "temporal_lru")],
        half_life=4.0, admission=False,
    )
    a, b = (0, 0), (0, 1)
    cache.put(a, blob(a))
    cache.put(b, blob(b))
    cache.get(a)  # 1 * 2**(-1/4) + 1 >= 1.5
    assert cache.tier_of(a) == "hot"
    for i in range(20):
        cache.get((5, i))  # misses move the clock
    cache.get(b)  # 1 * 2**(-21/4) + 1 < 1.5
    assert cache.tier_of(b) == "warm"


def test_history_outlives_eviction_and_misses_count():
    cache = ExpertCache([TierSpec("hot", U, "lfu", pin_threshold=3), TierSpec("warm", U, "lfu")], admission=False)
    a, b = (0, 0), (0, 1)
    cache.put(b, blob(b))
    for _ in range(3):
        assert cache.get(a) is None
    cache.put(a, blob(a))  # 3 accesses (all misses): straight through warm into hot
    assert cache.tier_of(a) == "hot" and cache.tier_of(b) == "warm"
    cache.put((0, 2), blob((0, 2)))  # warm's only slot: b goes
    cache.get(b)
    cache.get(b)
    cache.put(b, blob(b))  # b's count (3) now ties a's but is more recent: a is demoted, (0, 2) dropped
    assert cache.tier_of(b) == "hot" and cache.tier_of(a) == "warm" and not cache.contains((0, 2))


def test_pinned_layer_fills_tier_and_later_inserts_fail_gracefully():
    cache = one_tier("lru", 3, pin_layers=(0,))
    for i in range(3):
        assert cache.put((0, i), blob((0, i))) is not None
    assert cache.put((0, 3), blob((0, 3))) is None
    assert cache.put((1, 0), blob((1, 0))) is None
    s = cache.stats()
    assert s["layers"][0]["rejected"] == 1 and s["layers"][1]["rejected"] == 1 and s["evictions"] == 0
    assert all(cache.contains((0, i)) for i in range(3))


def test_too_large_slots_and_bad_arguments():
    cache = one_tier("lfu", 2)
    assert cache.put((0, 0), blob((0, 0), 2 * U + 1)) is None
    assert cache.stats()["rejected_too_large"] == 1
    slotted = ExpertCache([TierSpec("warm", 3 * 128, "lru")], slot_bytes=128, admission=False)
    assert slotted.put((0, 0), blob((0, 0), 100)) is not None
    assert slotted.put((0, 1), blob((0, 1), 129)) is None
    with pytest.raises(UsageError):
        ExpertCache([TierSpec("warm", U, "mru")])
    with pytest.raises(UsageError):
        ExpertCache([TierSpec("a", U), TierSpec("a", U)])


# -- views -----------------------------------------------------------------------------------------


def test_views_hold_exact_bytes_and_are_read_only():
    cache = one_tier("temporal_lru", 16)
    src = blob((3, 5), 1000)
    v = cache.put((3, 5), memoryview(src.tobytes()))
    np.testing.assert_array_equal(v, src)
    assert cache.get((3, 5)) is v and cache.put((3, 5), src) is v
    with pytest.raises(ValueError):
        v[0] = 1


def test_held_view_is_not_overwritten_after_eviction():
    cache = one_tier("lru", 1)
    a, b = (0, 0), (0, 1)
    held = cache.put(a, blob(a))[8:40].reshape(4, 8)  # a derived view, as QTensor.data would be
    assert cache.put(b, blob(b)) is None  # a was evicted, but its memory is still in use
    assert not cache.contains(a) and cache.stats()["draining_bytes"] == U
    np.testing.assert_array_equal(held.reshape(-1), blob(a)[8:40])
    del held
    np.testing.assert_array_equal(cache.put(b, blob(b)), blob(b))


# -- random workloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_budgets_counters_bytes(seed):
    rng = np.random.default_rng(seed)
    policies = ["lru", "lfu", "temporal_lru"]
    caps = {"hot": int(rng.integers(0, 8)) * U + int(rng.integers(0, U)), "warm": int(rng.integers(2, 12)) * U + 17}
    tiers = [
        TierSpec("hot", caps["hot"], policies[seed % 3], pin_threshold=float(rng.choice([1.5, 2.0, 3.0]))),
        TierSpec("warm", caps["warm"], policies[(seed + 1) % 3]),
    ]
    pin = (4,)
    cache = ExpertCache(tiers, pin_layers=pin, half_life=float(rng.choice([2.0, 16.0])))
    size = {(l, e): int(rng.choice([U - 5, U, 2 * U, 3 * U - 1])) for l in range(5) for e in range(6)}
    keys = list(size)
    gets = hits = 0
    evicted = {l: 0 for l in range(5)}
    inserted = {l: 0 for l in range(5)}
    held: list = []
    for step in range(1500):
        before = {k for k in keys if cache.contains(k)}
        key = keys[int(rng.integers(len(keys)))]
        op = rng.random()
        if op < 0.01:
            cache.clear()
            before, v = set(), None
        elif op < 0.7:
            gets += 1
            v = cache.get(key)
            hits += v is not None
            if v is None:
                v = cache.put(key, blob(key, size[key]))
                inserted[key[0]] += 0 if v is None else size[key]
            if v is not None:
                np.testing.assert_array_equal(v, blob(key, size[key]))
        else:
            was = cache.contains(key)
            v = cache.put(key, blob(key, size[key]))
            inserted[key[0]] += size[key] if v is not None and not was else 0
        if v is not None and rng.random() < 0.05:
            held.append((key, v[1:]))
        if held and rng.random() < 0.1:
            held.pop(int(rng.integers(len(held))))
        after = {k for k in keys if cache.contains(k)}
        for k in before - after:
            evicted[k[0]] += 1
            assert k[0] not in pin, f"pinned {k} evicted at step {step}"
        total = 0
        for name, cap in caps.items():
            resident = sum(size[k] for k in keys if cache.tier_of(k) == name)
            assert resident <= cap, f"{name} over budget at step {step}"
            assert cache.stats()["tiers"][name]["resident_bytes"] == resident
            total += resident
        assert cache.resident_bytes == total
        for k, view in held:
            np.testing.assert_array_equal(view, blob(k, size[k])[1:])
    s = cache.stats()
    assert (s["gets"], s["hits"], s["misses"]) == (gets, hits, gets - hits)
    for l in range(5):
        row = s["layers"].get(l, {"evictions": 0, "bytes_inserted": 0})
        assert row["evictions"] == evicted[l] and row["bytes_inserted"] == inserted[l]


def test_two_threads():
    cache = ExpertCache([TierSpec("hot", 6 * U, "temporal_lru", 1.5), TierSpec("warm", 10 * U, "lfu")], pin_layers=(0,),
                        admission=False)
    counts = [0, 0]
    errors: list = []
    blobs = {(l, e): blob((l, e)) for l in range(4) for e in range(8)}

    def worker(i):
        rng = np.random.default_rng(100 + i)
        try:
            for _ in range(3000):
                key = (int(rng.integers(4)), int(rng.integers(8)))
                v = cache.get(key)
                counts[i] += 1
                if v is None:
                    v = cache.put(key, blobs[key])
                if v is not None and not np.array_equal(v, blobs[key]):
                    raise AssertionError(f"wrong bytes for {key}")
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = cache.stats()
    assert s["gets"] == sum(counts) == s["hits"] + s["misses"]
    assert s["tiers"]["hot"]["resident_bytes"] <= 6 * U and s["tiers"]["warm"]["resident_bytes"] <= 10 * U
    assert s["resident_bytes"] == sum(U for l in range(4) for e in range(8) if cache.contains((l, e)))


def _sweep_hit_rate(cache, keys) -> float:
    hits = 0
    for key in keys:
        if cache.get(key) is not None:
            hits += 1
        else:
            cache.put(key, blob(key))
    return hits / len(keys)


def _belady_hit_rate(keys, slots) -> float:
    """The offline optimum (evict, or do not cache, whatever is next used farthest in the future)."""
    nxt, last = [0] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i], last[keys[i]] = last.get(keys[i], len(keys) + 1), i
    held: dict = {}
    hits = 0
    for i, key in enumerate(keys):
        if key in held:
            hits += 1
        elif len(held) >= slots:
            far = max(held, key=held.get)
            if held[far] <= nxt[i]:
                continue
            del held[far]
        held[key] = nxt[i]
    return hits / len(keys)


@pytest.mark.parametrize("policy", ["temporal_lru", "lru", "lfu"])
def test_admission_keeps_a_share_through_batch_sweeps(policy):
    """A batched step needs nearly every expert of every layer in order: a cache smaller than that sweep
    evicts each entry just before its next use. Admission keeps a fixed share, near the offline optimum."""
    rng = np.random.default_rng(0)
    keys = []
    for _ in range(300):  # steps of a batch: each layer's experts (most of them), layers in order
        for layer in range(8):
            keys += [(layer, int(e)) for e in np.sort(rng.choice(8, size=7, replace=False))]
    slots = 16  # a quarter of the 64 experts
    plain = _sweep_hit_rate(one_tier(policy, slots), keys)
    admitted = _sweep_hit_rate(one_tier(policy, slots, admission=True), keys)
    best = _belady_hit_rate(keys, slots)
    assert admitted > 0.75 * best, (plain, admitted, best)
    assert admitted > plain + 0.05, (plain, admitted, best)


def test_admission_lets_a_newly_popular_expert_in():
    cache = ExpertCache([TierSpec("warm", 4 * U, "temporal_lru")], half_life=32.0)
    for _ in range(50):  # four experts in steady use fill the cache
        for e in range(4):
            _sweep_hit_rate(cache, [(0, e)])
    new = (0, 9)
    assert cache.get(new) is None and cache.put(new, blob(new)) is None  # one access: no history to show
    assert cache.stats()["rejected_admission"] == 1
    for _ in range(100):  # the others fall out of use while the new one is used every time
        if cache.get(new) is None:
            cache.put(new, blob(new))
    assert cache.contains(new)


def test_admission_leaves_room_and_pins_alone():
    cache = ExpertCache([TierSpec("warm", 2 * U, "temporal_lru")], pin_layers=(5,))
    assert cache.put((0, 0), blob((0, 0))) is not None  # room left: nothing to compare with
    assert cache.put((0, 1), blob((0, 1))) is not None
    for _ in range(5):
        cache.get((0, 0))
        cache.get((0, 1))
    assert cache.put((0, 2), blob((0, 2))) is None  # full, and its history is empty
    assert cache.put((5, 0), blob((5, 0))) is not None  # a pinned layer's expert is always kept
