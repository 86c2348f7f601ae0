"""How well layer L's hidden state predicts the experts of layers L+1, L+2, …: the accuracy of prefetch
predictions by depth and by rank, from the model's own routers (memory-mapped, nothing streamed).

Decodes N sampled tokens; at every layer L of every one-token step, applies layer L+d's router to the hidden
state entering layer L's experts (as `Model._predict` does) and counts how often its r-th choice is among the
experts layer L+d really routes that token to. Also: the share of a layer's experts that the same layer used
for the token before (what routing history alone would predict).

    python tools/routing_lookahead.py MODEL.gguf [-n 64] [--depth 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgemoe.engine.core import generate  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402
from edgemoe.models.base import rms_norm  # noqa: E402
from edgemoe.models.moe import Model  # noqa: E402
from edgemoe.sampling import SamplingParams  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: the embedded model)")
    p.add_argument("-n", type=int, default=64, help="tokens to decode (sampled)")
    p.add_argument("--depth", type=int, default=3, help="layers ahead to evaluate")
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.model is None:
        from edgemoe.default_model import default_model_path

        args.model = default_model_path()
    loaded = load_model(args.model)
    m = loaded.model
    steps: list[tuple[int, np.ndarray, np.ndarray]] = []  # (layer, x (1, D), routed ids (1, A)) of one-token passes
    real = Model._routed

    def routed(self, h, x, layer, i, draft=None):
        if draft is None and x.shape[0] == 1 and layer.gate is not None:
            steps.append((i, x.copy(), self.route(h, layer)[0].copy()))
        return real(self, h, x, layer, i, draft)

    Model._routed = routed
    tok = loaded.tokenizer
    prompt = tok.encode("The king said") if tok is not None else [1, 17, 43, 99]
    generate(m, prompt, args.n, SamplingParams(temperature=args.temp, seed=args.seed), eos=False)
    Model._routed = real

    layers = m.weights.layers
    tokens, cur = [], {}
    for i, x, ids in steps:  # regroup the passes into tokens: layer → (x, ids)
        if i in cur:
            tokens.append(cur)
            cur = {}
        cur[i] = (x, ids)
    tokens.append(cur)
    hits = collections.defaultdict(lambda: [0, 0])  # (depth, rank) → [right, predictions]
    for t in tokens:
        for i, (x, _) in t.items():
            for d in range(1, args.depth + 1):
                if i + d not in t:
                    continue
                nxt = layers[i + d]
                pred = m.route(rms_norm(x, nxt.post_attention_layernorm, m.args.rms_norm_eps), nxt)[0][0]
                actual = set(t[i + d][1][0].tolist())
                for r, e in enumerate(pred.tolist()):
                    hits[d, r][0] += e in actual
                    hits[d, r][1] += 1
    same = [0, 0]
    for a, b in zip(tokens, tokens[1:]):
        for i in a.keys() & b.keys():
            pa, pb = set(a[i][1][0].tolist()), set(b[i][1][0].tolist())
            same[0] += len(pa & pb)
            same[1] += len(pb)
    print(f"{args.model}: {len(tokens)} tokens, {m.args.num_experts_per_tok} of {m.args.num_local_experts} experts")
    print(f"{'depth':>5} {'rank':>4} {'right':>6} {'predictions':>11}")
    for (d, r), (right, n) in sorted(hits.items()):
        print(f"{d:>5} {r + 1:>4} {right / n:>6.0%} {n:>11}")
    if same[1]:
        print(f"the token before, same layer: {same[0] / same[1]:.0%} of experts repeat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
