"""Replay a routing trace through the expert cache's policies at several budgets and print hit rates.

    python tools/replay_cache.py TRACE.jsonl [--budgets 0.1,0.25,0.5] [--hot-fraction 0.25]
    python tools/replay_cache.py --synthetic [--layers 32 --experts 8 --top-k 2 --tokens 2000]
                                 [--zipf 1.0 --repeat 0.25 --phase 500 --seed 0] [--batch 1] [--write-trace OUT]

A trace is JSON lines `{"layer": L, "experts": [e, ...]}`, one line per layer per token, in execution
order. Each routed expert is a get(); a miss inserts it. Budgets are fractions of all experts
(every expert counts the same size); `belady` is the offline optimum for one cache of the whole
budget, an upper bound. Hit rate is not speed: a policy has to win end to end (SPEC §9).

The synthetic trace draws experts per layer from a Zipf popularity, repeats the previous token's
first choice with probability --repeat (Mixtral: 24-28 % in middle layers vs 1/8 at random), and
reshuffles each layer's popularity every --phase tokens (a topic change). With --batch B, B such streams
(seeds seed … seed+B-1) decode together: each step's line for a layer is the union of their experts, as a
batched engine step fetches them. Each policy runs with the cache's admission rule (the default) and without
(`-adm`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe.experts.cache import ExpertCache, TierSpec  # noqa: E402

POLICIES = ("lru", "lfu", "temporal_lru")
UNIT = 64  # bytes per replayed expert: the cache only sees sizes, so blobs stay tiny


def synthetic_trace(layers, experts, top_k, tokens, zipf, repeat, phase, seed) -> list[tuple[int, list[int]]]:
    """(layer, experts) per layer per token; see the module docstring."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1) ** zipf  # (E,) by popularity rank
    weights /= weights.sum()
    trace, prev = [], [None] * layers
    for t in range(tokens):
        if t % phase == 0:
            popular = [rng.permutation(experts) for _ in range(layers)]  # rank -> expert id, per layer
        for layer in range(layers):
            if prev[layer] is not None and rng.random() < repeat:
                first = prev[layer]
            else:
                first = int(popular[layer][rng.choice(experts, p=weights)])
            p = weights.copy()
            p[np.flatnonzero(popular[layer] == first)] = 0.0
            rest = popular[layer][rng.choice(experts, size=top_k - 1, replace=False, p=p / p.sum())]
            prev[layer] = first
            trace.append((layer, [first, *map(int, rest)]))
    return trace


def batched_trace(batch: int, layers, experts, top_k, tokens, zipf, repeat, phase, seed) -> list:
    """`batch` synthetic streams stepped together: per step and layer, the union of their experts."""
    streams = [synthetic_trace(layers, experts, top_k, tokens, zipf, repeat, phase, seed + b) for b in range(batch)]
    return [(i % layers, list(dict.fromkeys(e for s in streams for e in s[i][1]))) for i in range(tokens * layers)]


def read_trace(path: str) -> list[tuple[int, list[int]]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(int(r["layer"]), [int(e) for e in r["experts"]]) for r in rows]


def accesses(trace) -> list[tuple[int, int]]:
    """Flatten to the get() sequence; an expert routed twice in one line is fetched once."""
    return [(layer, e) for layer, experts in trace for e in dict.fromkeys(experts)]


def replay(keys, policy, slots, hot_fraction, pin_threshold, half_life, admission: bool = True) -> dict:
    hot = int(round(slots * hot_fraction))
    tiers = [TierSpec("warm", (slots - hot) * UNIT, policy)]
    if hot:
        tiers.insert(0, TierSpec("hot", hot * UNIT, policy, pin_threshold))
    kw = {"admission": admission} if half_life is None else {"half_life": half_life, "admission": admission}
    cache = ExpertCache(tiers, **kw)
    blob = np.zeros(UNIT, np.uint8)
    for key in keys:
        if cache.get(key) is None:
            cache.put(key, blob)
    return cache.stats()


def belady_hits(keys, slots) -> int:
    """Hits of the offline optimum (evict the entry used furthest in the future)."""
    nxt, seen = [0] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = seen.get(keys[i], len(keys) + i)  # never again: beyond every real position, distinct
        seen[keys[i]] = i
    resident: dict = {}  # key -> its next use
    heap: list = []  # (-next use, key); stale items skipped
    hits = 0
    for i, key in enumerate(keys):
        if key in resident:
            hits += 1
        elif len(resident) >= slots:
            while True:
                neg, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    break
        if slots:
            resident[key] = nxt[i]
            heapq.heappush(heap, (-nxt[i], key))
    return hits


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", nargs="?", help="routing trace (JSON lines); omit with --synthetic")
    p.add_argument("--synthetic", action="store_true", help="generate a Zipf + locality trace")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent (0 = uniform)")
    p.add_argument("--repeat", type=float, default=0.25, help="P(first choice = previous token's)")
    p.add_argument("--phase", type=int, default=500, help="tokens between popularity reshuffles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="streams decoding together (synthetic)")
    p.add_argument("--write-trace", help="also save the synthetic trace here")
    p.add_argument("--budgets", default="0.1,0.25,0.5,0.75", help="fractions of all experts")
    p.add_argument("--hot-fraction", type=float, default=0.25, help="share of the budget in the hot tier")
    p.add_argument(
        "--pin-threshold",
        type=float,
        default=None,
        help="hot tier's promotion score (default: 2 for "
        "lru/lfu = promote on reuse, 1.5 for temporal_lru = reuse within one half-life)",
    )
    p.add_argument("--half-life", type=float, default=None, help="temporal_lru half-life in accesses")
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.synthetic == bool(args.trace):
        print("give a trace file or --synthetic (not both)", file=sys.stderr)
        return 2
    if args.synthetic:
        trace = batched_trace(args.batch, args.layers, args.experts, args.top_k, args.tokens, args.zipf,
                              args.repeat, args.phase, args.seed)
        if args.write_trace:
            with open(args.write_trace, "w") as f:
                f.writelines(json.dumps({"layer": layer, "experts": ex}) + "\n" for layer, ex in trace)
        what = (
            f"synthetic: {args.tokens} tokens x {args.layers} layers, top-{args.top_k} of {args.experts}, "
            f"zipf {args.zipf}, repeat {args.repeat}, phase {args.phase}, seed {args.seed}, batch {args.batch}"
        )
    else:
        trace = read_trace(args.trace)
        what = args.trace
    keys = accesses(trace)
    universe = len(set(keys))
    print(
        f"trace {what}\n{len(keys)} expert uses over {universe} distinct experts; "
        f"hot tier = {args.hot_fraction:.0%} of the budget"
    )
    names = [p + suffix for p in POLICIES for suffix in ("", "-adm")]
    print(f"{'budget':>7} {'slots':>6} " + " ".join(f"{p:>16}" for p in names) + f" {'belady':>8}")
    for frac in (float(x) for x in args.budgets.split(",")):
        slots = max(1, int(round(frac * universe)))
        cells = []
        for policy in POLICIES:
            thr = args.pin_threshold if args.pin_threshold is not None else (1.5 if policy == "temporal_lru" else 2.0)
            for admission in (False, True):
                s = replay(keys, policy, slots, args.hot_fraction, thr, args.half_life, admission)
                cells.append(f"{s['hit_rate']:16.1%}")
        best = belady_hits(keys, slots) / len(keys)
        print(f"{frac:7.0%} {slots:6d} " + " ".join(cells) + f" {best:8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
