"""JSON-constrained decoding benchmark: per-token decode time with and without a `response_format` grammar.

On the default model (or -m), greedy, the same prompt (the plain chat format of a "reply in JSON" conversation),
through EngineCore as `serve` runs it. Unconstrained and constrained (json_object: {"type": "object"}; after
`{"` the default model writes one long string, so both run the full --tokens) take turns, --runs measured runs
each after one unmeasured one; medians of decode ms/token (the steps after the first token). Also the grammar's
own work per token, timed inside the run: the mask (llguidance's bitmask + unpacking + -inf) and the consume.

    python tools/bench_constrained.py --tokens 128 --runs 5 [-m MODEL] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgemoe.chat import ChatTemplate  # noqa: E402
from edgemoe.default_model import default_model_path  # noqa: E402
from edgemoe.engine.core import EngineCore, run_to_end  # noqa: E402
from edgemoe.engine.grammar import Grammar, Matcher  # noqa: E402
from edgemoe.engine.request import Request  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402
from edgemoe.sampling import SamplingParams  # noqa: E402

MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who art thou?"}]


class _Timed:
    """Wraps Matcher's two per-token calls to add up their time."""

    def __init__(self):
        self.mask_s = self.consume_s = 0.0
        self.calls = 0

    def install(self):
        mask, consume = Matcher.__call__, Matcher.consume
        timed = self

        def timed_mask(m, w):
            t = time.perf_counter()
            mask(m, w)
            timed.mask_s += time.perf_counter() - t
            timed.calls += 1

        def timed_consume(m, tok):
            t = time.perf_counter()
            consume(m, tok)
            timed.consume_s += time.perf_counter() - t

        Matcher.__call__, Matcher.consume = timed_mask, timed_consume


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF or HF directory (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    loaded = load_model(args.model or default_model_path())
    tok, model = loaded.tokenizer, loaded.model
    ids = ChatTemplate.plain(tok).encode(MESSAGES)
    t = time.perf_counter()
    grammar = Grammar.json_schema({"type": "object"}, tok, model.args.vocab_size)
    compile_ms = (time.perf_counter() - t) * 1e3
    timed = _Timed()
    timed.install()
    per_token: dict[str, list[float]] = {"free": [], "json": []}
    grammar_ms: list[float] = []
    for run in range(args.runs + 1):
        for name in ("free", "json"):
            req = Request(ids, args.tokens, SamplingParams(temperature=0.0), grammar=grammar if name == "json" else None)
            before = (timed.mask_s + timed.consume_s, timed.calls)
            run_to_end(EngineCore(model, tok), req)
            if len(req.tokens) != args.tokens:
                raise SystemExit(f"{name}: {len(req.tokens)} tokens ({req.finish_reason}), not {args.tokens}")
            if run == 0:
                continue  # warm-up: Numba compilation, caches
            per_token[name].append(req.decode_s / (len(req.tokens) - 1) * 1e3)
            if name == "json":
                spent, calls = timed.mask_s + timed.consume_s - before[0], timed.calls - before[1]
                grammar_ms.append(spent / calls * 1e3)
    free, constrained = statistics.median(per_token["free"]), statistics.median(per_token["json"])
    out = {"model": args.model or "default", "tokens": args.tokens, "runs": args.runs,
           "free_ms_per_token": round(free, 3), "json_ms_per_token": round(constrained, 3),
           "ratio": round(constrained / free, 4), "grammar_ms_per_token": round(statistics.median(grammar_ms), 4),
           "grammar_share": round(statistics.median(grammar_ms) / free, 4), "compile_ms": round(compile_ms, 2),
           "runs_ms": {k: [round(x, 2) for x in v] for k, v in per_token.items()},
           "command": "python tools/bench_constrained.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'':24}{'ms/token (median)':>18}")
    print(f"{'free text':24}{free:18.3f}")
    print(f"{'json_object grammar':24}{constrained:18.3f}")
    print(f"ratio {out['ratio']:.3f}; the grammar's own work (mask + consume) {out['grammar_ms_per_token']:.3f} ms/token "
          f"= {100 * out['grammar_share']:.1f} % of a free token; schema compile {compile_ms:.2f} ms")
    print("runs (ms/token):", out["runs_ms"])
    print("command:", out["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
