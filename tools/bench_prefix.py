"""Prompt-prefix reuse benchmark: time to first token for a long prompt seen before, with and without the prefix
cache (engine/prefix_cache.py, `server.prompt_cache_mb`).

Two cases, on one Session (the default model unless -m), greedy, through EngineCore as `serve` and `chat` run it:
  repeat  the same ~1,000-token prompt again (llama-server's cache_prompt case): all but its last token reused;
  turn    a conversation's next turn: the previous prompt + its 16-token reply + 64 new tokens.
TTFT is from admission (the KV rows copied in) to the first token's event. The two cores (one without a prefix
cache, one with) take turns run by run, `--runs` measured runs each after one unmeasured one; medians. Each run's
first token and its top-5 log-probabilities must be the same with and without reuse (the tests check every
logit bit: tests/test_prefix_cache.py).

    python tools/bench_prefix.py --tokens 1000 --runs 5 [--threads N] [-m MODEL] [--ctx N] [--cache-mb N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgemoe.cli import build_parser  # noqa: E402
from edgemoe.config import config_from_args  # noqa: E402
from edgemoe.engine.core import run_to_end  # noqa: E402
from edgemoe.engine.request import Request  # noqa: E402
from edgemoe.engine.session import Session  # noqa: E402
from edgemoe.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
REPLY = 16  # tokens of the previous turn's reply (turn case)
NEW = 64  # tokens the next turn adds


def first_token(core, prompt: list[int], n: int = 1) -> tuple[float, Request, dict]:
    """(seconds from admission to the first token, the request, that token's event)"""
    seen: list[tuple[float, dict]] = []
    t0 = time.perf_counter()
    req = run_to_end(core, Request(prompt, n, GREEDY, logprobs=5,
                                   emit=lambda ev: ev["type"] == "token" and not seen and
                                   seen.append((time.perf_counter(), ev))))
    if req.error is not None:
        raise req.error
    return seen[0][0] - t0, req, seen[0][1]


def bench_case(plain, reuse, prompt: list[int], prepare, runs: int) -> dict:
    """Median TTFT of `prompt` on both cores; `prepare(core)` runs before each measured request (unmeasured)."""
    times: dict[str, list[float]] = {"plain": [], "reuse": []}
    reused, identical = 0, True
    for r in range(runs + 1):
        order = [("plain", plain), ("reuse", reuse)] if r % 2 else [("reuse", reuse), ("plain", plain)]
        events = {}
        for name, core in order:
            prepare(core)
            dt, req, ev = first_token(core, prompt)
            events[name] = (ev["id"], ev["top"])
            if r > 0:  # the first round is unmeasured: it fills the prefix cache and pages everything in
                times[name].append(dt)
            if name == "reuse":
                reused = req.reused
        identical &= events["plain"] == events["reuse"]
    return {"prompt_tokens": len(prompt), "reused_tokens": reused,
            "ttft_plain_s": statistics.median(times["plain"]), "ttft_reuse_s": statistics.median(times["reuse"]),
            "runs_plain_s": [round(t, 4) for t in times["plain"]], "runs_reuse_s": [round(t, 4) for t in times["reuse"]],
            "identical": identical}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="model (default: the embedded default model)")
    p.add_argument("--tokens", type=int, default=1000, help="prompt tokens (default 1000)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per case and core (default 5)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's, at most 4096)")
    p.add_argument("--cache-mb", type=float, default=None, help="stream experts through a RAM cache of this many MB")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    run_argv = ["run"] + [a for flag, v in (("-m", args.model), ("--threads", args.threads), ("--ctx", args.ctx),
                                              ("--cache-mb", args.cache_mb)) if v is not None for a in (flag, str(v))]
    run_args = build_parser().parse_args(run_argv)
    session = Session(run_args, config_from_args(run_args), progress=False)
    try:
        if args.tokens + 1 > session.n_ctx:
            raise SystemExit(f"--tokens {args.tokens} + 1 generated token exceed the context of {session.n_ctx}; "
                             "lower --tokens or raise --ctx")
        session.warm_up()
        plain, reuse = session.core(prompt_cache=False), session.core()
        assert plain.prefix_cache is None and reuse.prefix_cache is not None
        vocab = session.loaded.args.vocab_size
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(3, vocab, args.tokens)]
        cases = {"repeat": bench_case(plain, reuse, prompt, lambda core: None, args.runs)}
        previous = prompt[:args.tokens - REPLY - NEW]
        new = [int(t) for t in rng.integers(3, vocab, NEW)]
        turn: list[int] = []

        def previous_turn(core) -> None:  # the earlier turn runs on the same core just before: its rows are kept
            if core.prefix_cache is not None:  # and no longer entry (the last run's turn)
                core.prefix_cache.clear()
            turn[:] = previous + first_token(core, previous, REPLY)[1].tokens + new

        cases["turn"] = bench_case(plain, reuse, turn, previous_turn, args.runs)
        threads = session.thread_figures()
        layout = session.layout()
        model = session.model_path
    finally:
        session.close()
    out = {"model": model, "threads": threads, "layout": layout, "streamed": args.cache_mb is not None,
           "cpu": platform.processor() or platform.machine(), "command": "python tools/bench_prefix.py " +
           " ".join(argv if argv is not None else sys.argv[1:]), "cases": cases}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model {os.path.basename(model)} ({layout}, {threads} threads{', streamed' if out['streamed'] else ''}); "
          f"median of {args.runs} runs; command: {out['command']}")
    print(f"{'case':<8} {'prompt':>6} {'reused':>6} {'TTFT without':>13} {'TTFT with':>10} {'ratio':>7}  identical")
    for name, c in cases.items():
        print(f"{name:<8} {c['prompt_tokens']:>6} {c['reused_tokens']:>6} {c['ttft_plain_s'] * 1e3:>10.1f} ms "
              f"{c['ttft_reuse_s'] * 1e3:>7.1f} ms {c['ttft_plain_s'] / c['ttft_reuse_s']:>6.1f}×  "
              f"{'yes' if c['identical'] else 'NO'}")
    return 0 if all(c["identical"] for c in cases.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
