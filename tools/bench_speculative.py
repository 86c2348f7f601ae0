"""Speculative decoding benchmark: decode tokens/s with and without each proposer, in RAM and streamed.

Models: the embedded default model (trained: real routing locality and real text, with its shipped draft)
and a synthetic random-weight Mixtral-shape model (tools/synth_model.py; no locality, no draft). Settings:
in RAM (memory-mapped), and experts streamed through caches of 25 %, 50 % and 100 % of the expert bytes.
Proposers: off (plain decoding), lookup, self, draft (default model only) and auto. Greedy decoding of
Shakespeare prompts (default model) or fixed random prompts (synthetic). Within a setting the proposers take
turns prompt by prompt (each going first in turn, after one unmeasured round that warms the disk's host-side
cache and the gates), `--repeat` rounds, so every ratio compares runs taken moments apart: `vs off` is the
median over rounds of each round's ratio to plain decoding, reported with the acceptance rate and the tokens
each verification pass yielded. Each proposer keeps its own session (and gate) for the whole setting.

    python tools/bench_speculative.py --threads 2 --repeat 3 --json docs/bench_speculative.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from edgemoe.cli import build_parser  # noqa: E402
from edgemoe.config import config_from_args  # noqa: E402
from edgemoe.engine.core import run_to_end  # noqa: E402
from edgemoe.engine.request import Request  # noqa: E402
from edgemoe.engine.session import Session  # noqa: E402
from edgemoe.sampling import SamplingParams  # noqa: E402

PROMPTS = ["ROMEO. ", "To be, or not to be, that is the question:\n", "KING HENRY.\nOnce more unto the breach, ",
           "First Citizen.\nBefore we proceed any further, hear me speak.\n"]
GREEDY = SamplingParams(temperature=0.0)


def synthetic(args) -> str:
    path = os.path.join(args.dir, f"spec-synth-s{args.scale}-l{args.layers}.gguf")
    if not os.path.exists(path):
        os.makedirs(args.dir, exist_ok=True)
        subprocess.run([sys.executable, os.path.join(HERE, "synth_model.py"), "mixtral-8x7b", "-o", path, "--scale",
                        str(args.scale), "--layers", str(args.layers), "--expert-quant", "Q4_0", "--packed", "-q"],
                       check=True)
    return path


def expert_mb(path: str) -> tuple[float, int]:
    """(MB of experts, vocabulary size)"""
    from edgemoe.experts.setup import StreamOptions
    from edgemoe.loader import load_model

    loaded = load_model(path, StreamOptions.from_budget(1))
    ex = loaded.model.experts
    total = sum(e.nbytes for layer in ex.extents for e in layer)
    ex.close()
    return total / 2**20, loaded.args.vocab_size


def session(model: str, spec: str, draft: str | None, k: int, threads: int, cache_mb: float | None) -> Session:
    argv = ["run", "-m", model, "--threads", str(threads), "--spec", spec, "--draft-max", str(k)]
    if draft is not None:
        argv += ["--draft-model", draft]
    if cache_mb is not None:
        argv += ["--cache-mb", f"{cache_mb:.3f}"]
    args = build_parser().parse_args(argv)
    s = Session(args, config_from_args(args))
    s.warm_up()
    return s


def decode(core, prompt: list[int], n: int):
    """Greedy decode of one prompt; the request."""
    req = run_to_end(core, Request(prompt, n, GREEDY))
    if req.finish_reason == "error":
        raise SystemExit("a request failed (see the log above)")
    return req


def bench_setting(model, proposers, draft, prompts, args, cache_mb) -> list[dict]:
    """Every proposer on every prompt, alternating prompt by prompt, `--repeat` rounds; per round each proposer's
    tokens/s over all prompts and its ratio to plain decoding in that round (paired: taken moments apart)."""
    sessions = {p: session(model, p, draft if p in ("draft", "auto") else None, args.k, args.threads, cache_mb)
                for p in proposers}
    cores = {p: s.core() for p, s in sessions.items()}  # one core per proposer: its gate keeps learning
    rounds: dict[str, list[dict]] = {p: [] for p in proposers}
    tokens: dict[str, list] = {p: [] for p in proposers}
    for prompt in prompts:  # unmeasured: the disk's host-side cache and every gate warm up
        for p in proposers:
            decode(cores[p], prompt, args.n)
    turn = 0
    for _ in range(args.repeat):
        acc = {p: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "passes": 0} for p in proposers}
        for prompt in prompts:
            turn += 1
            for p in proposers[turn % len(proposers):] + proposers[:turn % len(proposers)]:  # each goes first in turn
                req = decode(cores[p], prompt, args.n)
                a = acc[p]
                a["tokens"] += len(req.tokens) - 1
                a["seconds"] += req.decode_s
                a["drafted"] += req.drafted
                a["accepted"] += req.accepted
                a["passes"] += req.passes
                tokens[p].append(req.tokens)
        for p in proposers:
            rounds[p].append(dict(acc[p], tok_s=acc[p]["tokens"] / acc[p]["seconds"]))
    for s in sessions.values():
        s.close()
    out = []
    for p in proposers:
        rs = rounds[p]
        drafted = sum(r["drafted"] for r in rs)
        ratios = [r["tok_s"] / o["tok_s"] for r, o in zip(rs, rounds["off"])]
        out.append({"proposer": p, "decode_tok_s": round(statistics.median(r["tok_s"] for r in rs), 2),
                    "vs_off": round(statistics.median(ratios), 3), "vs_off_rounds": [round(x, 3) for x in ratios],
                    "acceptance": round(sum(r["accepted"] for r in rs) / drafted, 3) if drafted else None,
                    "tokens_per_pass": round(sum(r["tokens"] for r in rs) / sum(r["passes"] for r in rs), 2),
                    "greedy_identical": tokens[p] == tokens["off"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("-n", type=int, default=96, help="tokens per prompt")
    p.add_argument("-k", type=int, default=8, help="--draft-max for every proposer")
    p.add_argument("--budgets", default="none,25,50,100", help="none = in RAM; else %% of expert bytes cached")
    p.add_argument("--models", default="default,synthetic")
    p.add_argument("--dir", default="/tmp/edgemoe-bench", help="where the synthetic model is written")
    p.add_argument("--scale", type=float, default=0.125)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    from edgemoe.default_model import default_model_path, draft_model_path
    from edgemoe.tokenizer import load_tokenizer

    results = []
    for which in args.models.split(","):
        if which == "default":
            model, draft = default_model_path(), draft_model_path()
            total, _ = expert_mb(model)
            tok = load_tokenizer(model)
            prompts = [tok.encode(t) for t in PROMPTS]
            proposers = ["off", "lookup", "self", "draft", "auto"]
        else:
            model, draft = synthetic(args), None
            total, vocab = expert_mb(model)
            rng = np.random.default_rng(0)
            prompts = [[1] + rng.integers(3, vocab, 24).tolist() for _ in range(len(PROMPTS))]
            proposers = ["off", "lookup", "self", "auto"]
        for budget in args.budgets.split(","):
            cache_mb = None if budget == "none" else total * float(budget) / 100
            label = "in RAM" if cache_mb is None else f"streamed {budget} %"
            print(f"{which}: {label} ({total:.1f} MB of experts)", file=sys.stderr, flush=True)
            for row in bench_setting(model, proposers, draft, prompts, args, cache_mb):
                row.update(model=which, setting=label)
                results.append(row)
                print(f"  {row['proposer']:7s} {row['decode_tok_s']:9.1f} tok/s  {row['vs_off']:5.2f}x "
                      f"(rounds {row['vs_off_rounds']})  acceptance "
                      f"{row['acceptance'] if row['acceptance'] is not None else '-'}  "
                      f"{row['tokens_per_pass']:.2f} tokens/pass  identical {row['greedy_identical']}", flush=True)
    print("\n| model | setting | proposer | decode tok/s | vs off | acceptance | tokens/pass |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "–"
        print(f"| {r['model']} | {r['setting']} | {r['proposer']} | {r['decode_tok_s']:.1f} | {r['vs_off']:.2f}x | "
              f"{acc} | {r['tokens_per_pass']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
