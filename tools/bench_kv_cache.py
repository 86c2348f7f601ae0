"""KV cache types: accuracy of f16 and q8_0 against f32, and decode speed at long contexts.

    python tools/bench_kv_cache.py [-m MODEL] [--tokens 256] [--contexts 512,4096,16384] [--steps 32] [--runs 5]

Accuracy (on -m, default the embedded model): greedy decoding of `--tokens` tokens after a prompt with each cache
type; the share of steps where f16 (q8_0) picks f32's token (each run follows its own tokens), and max |Δlogit|
over the steps where both had the same history (teacher-forced on f32's tokens).

Speed: for each context P, a cache of each type is filled with P positions of random keys and values (attention's
cost depends only on how many there are), then `--steps` one-token decode passes are timed; medians of `--runs`.
Also the attention share: the same passes at P = 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from edgemoe.loader import load_model


def accuracy(m, tokenizer, n: int, cache_type: str) -> dict:
    ids = tokenizer.encode("ROMEO.\nBut soft, what light through yonder window breaks? It is the east,") \
        if tokenizer is not None else list(range(1, 17))

    def greedy(cache_type, forced=None):
        cache = m.new_cache(len(ids) + n + 1, cache_type)
        logits = [m.forward(np.asarray(ids), cache)[-1]]
        toks = []
        for i in range(n):
            t = int(logits[-1].argmax()) if forced is None else forced[i]
            toks.append(t)
            logits.append(m.forward(np.asarray([t]), cache)[-1])
        return toks, np.stack(logits)

    toks32, l32 = greedy("f32")
    toks16, _ = greedy(cache_type)
    _, forced16 = greedy(cache_type, toks32)
    same = next((i for i, (a, b) in enumerate(zip(toks32, toks16)) if a != b), n)
    return {"cache_type": cache_type, "tokens": n, "greedy_identical_prefix": same,
            "greedy_agreement": round(sum(a == b for a, b in zip(toks32, toks16)) / n, 4),
            "max_abs_dlogit": float(np.abs(forced16 - l32).max()),
            "mean_abs_dlogit": float(np.abs(forced16 - l32).mean()), "max_abs_logit": float(np.abs(l32).max())}


def decode_ms(m, cache_type: str, context: int, steps: int, rng) -> float:
    cache = m.new_cache(context + steps + 1, cache_type)
    L, K = cache.k.shape[:2]
    fill = rng.standard_normal((L, K, context, m.args.head_dim)).astype(np.float32)  # (L, K, P, d)
    if cache_type == "f16":
        fill = fill.astype(np.float16).view(np.uint16)
    if cache_type == "q8_0":
        from gguf import GGMLQuantizationType

        from edgemoe.quants import quantize

        fill = quantize(fill, GGMLQuantizationType.Q8_0)
    cache.k[:, :, :context] = fill
    cache.v[:, :, :context] = fill
    cache.length = context
    tok = 1
    m.forward(np.asarray([tok]), cache)  # compiled and paged in before the clock
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(m.forward(np.asarray([tok]), cache)[-1].argmax())
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="GGUF model (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=256, help="greedy tokens for the accuracy figures")
    p.add_argument("--contexts", default="512,4096,16384")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.model is None:
        from edgemoe.default_model import default_model_path

        args.model = default_model_path()
    loaded = load_model(args.model)
    m = loaded.model
    types = ["f32", "f16"] + (["q8_0"] if m.args.head_dim % 32 == 0 else [])
    out = {"model": args.model, "accuracy": [accuracy(m, loaded.tokenizer, args.tokens, t) for t in types[1:]],
           "speed": []}
    for a in out["accuracy"]:
        print(f"{args.model}: {a['cache_type']} against f32 over {a['tokens']} greedy tokens: "
              f"{a['greedy_agreement']:.1%} the same token (identical for the first {a['greedy_identical_prefix']}), "
              f"max |dlogit| {a['max_abs_dlogit']:.4f} (mean {a['mean_abs_dlogit']:.5f}; logits up to "
              f"{a['max_abs_logit']:.1f})")
    rng = np.random.default_rng(0)
    contexts = [1] + [int(c) for c in args.contexts.split(",")]
    for context in contexts:
        if context + args.steps + 1 > m.args.max_position_embeddings:
            print(f"  context {context}: beyond the model's {m.args.max_position_embeddings} positions, skipped")
            continue
        ms = {t: [] for t in types}
        for _ in range(args.runs):
            for t in ms:  # alternated: the box's drift hits each alike
                ms[t].append(decode_ms(m, t, context, args.steps, rng))
        med = {t: statistics.median(v) for t, v in ms.items()}
        row = {"context": context, **{f"{t}_ms": round(med[t], 3) for t in types}}
        out["speed"].append(row)
        print(f"  context {context:6d}: decode ms/token " + "  ".join(
            f"{t} {med[t]:8.3f}" + (f" ({med['f32'] / med[t]:.2f}x)" if t != "f32" else "") for t in types))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
