"""`edgemoe bench`: prefill and decode tokens/s on this box, against the memory (and disk) bandwidth bound.

The bound of a decode step is the time to read what it touches: the dense weights one token reads plus its
active experts, at the memory bandwidth measured in the same run; when streaming, the missed share of the
active experts (1 - cache hit rate) comes from disk at its measured O_DIRECT bandwidth instead.
"""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np

from ..config import add_config_arguments, config_from_args
from ..errors import UsageError


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    p.add_argument("-p", "--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to decode per run (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="runs; medians are reported (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_session_arguments(p)
    add_config_arguments(p)


def bound_tok_s(sizes: dict, mem_bps: float, disk_bps: float | None = None, hit_rate: float = 1.0) -> float:
    """Tokens/s if a decode step only had to read its bytes: the dense weights and the cached share of its
    active experts from RAM, the missed share from disk (no disk: every expert in RAM)."""
    active = sizes["expert_bytes_per_token"]
    hit = hit_rate if disk_bps else 1.0
    t = (sizes["dense_bytes_per_token"] + hit * active) / mem_bps
    return 1.0 / (t + ((1 - hit) * active / disk_bps if disk_bps else 0.0))


def main(args) -> int:
    from tqdm import tqdm

    from ..doctor import model_sizes
    from ..engine.core import run_to_end
    from ..engine.request import Request
    from ..engine.session import Session
    from ..engine.threads import describe as describe_threads
    from ..membw import memory_read_gbs
    from ..sampling import SamplingParams

    if args.prompt_tokens < 1 or args.n_predict < 2 or args.repeat < 1:
        raise UsageError("--prompt-tokens must be >= 1, -n >= 2 and --repeat >= 1")
    cfg = config_from_args(args)
    args.ctx = args.ctx or args.prompt_tokens + args.n_predict + 1

    bar = tqdm(total=args.repeat + 3, desc="edgemoe bench", file=sys.stderr, disable=args.json)
    bar.set_postfix_str("memory bandwidth")
    mem_gbs = memory_read_gbs()
    bar.update()
    bar.set_postfix_str("load + warm-up")
    # without --json the bench's own bar names the phases; the fused kernels are compiled before measuring
    session = Session(args, cfg, progress=args.json, compile_wait=True)
    loaded = session.loaded
    disk_gbs = None
    if session.stream is not None:
        from ..doctor_disk import LIMIT_THREADS, read_bandwidth

        bar.set_postfix_str("disk bandwidth")
        disk_gbs = read_bandwidth(session.model_path, seconds=2.0, threads=LIMIT_THREADS,
                                  direct=session.stream.direct_io) / 1e9
    bar.update()
    n_ctx = args.prompt_tokens + args.n_predict + 1
    if n_ctx > loaded.args.max_position_embeddings:
        raise UsageError(f"--prompt-tokens + -n = {n_ctx} exceed the model's context "
                         f"({loaded.args.max_position_embeddings})")
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, loaded.args.vocab_size, args.prompt_tokens)]
    session.warm_up()  # compile / load kernels, page in
    core = session.core(prompt_cache=False)  # every run prefills its whole prompt: that is what is measured
    bar.update()
    runs, specs = [], []
    for r in range(args.repeat):
        bar.set_postfix_str(f"run {r + 1}/{args.repeat}")
        req = run_to_end(core, Request(prompt, args.n_predict, greedy))
        if req.error is not None:
            bar.close()
            raise req.error
        runs.append((req.prefill_tok_s, req.decode_tok_s))
        if core.gate is not None:
            specs.append(req.speculative_figures(core.proposer_name, session.spec.k_max))
        bar.update()
    bar.close()
    figures = session.stream_figures()
    threads = session.thread_figures(core)
    session.close()

    sizes = model_sizes(loaded)
    hit = figures["cache"]["hit_rate"] if figures else 1.0
    tokens = args.repeat * (args.prompt_tokens + args.n_predict) + 4
    read_per_token = figures["cache"]["bytes_read"] / tokens if figures else 0.0
    bound = bound_tok_s(sizes, mem_gbs * 1e9, disk_gbs and disk_gbs * 1e9, hit)
    decode = statistics.median(d for _, d in runs)
    out = {
        "model": loaded.path, "threads": threads,
        "prefill_tok_s": round(statistics.median(p for p, _ in runs), 2), "decode_tok_s": round(decode, 2),
        "decode_bound_tok_s": round(bound, 2), "of_bound": round(decode / bound, 3),
        "memory_read_gb_s": round(mem_gbs, 2), "disk_read_gb_s": disk_gbs and round(disk_gbs, 3),
        "bytes_per_token": {"dense": sizes["dense_bytes_per_token"], "experts": sizes["expert_bytes_per_token"],
                            "read_from_disk": round(read_per_token)},
        "runs": [{"prefill_tok_s": round(p, 2), "decode_tok_s": round(d, 2)} for p, d in runs],
        "speculative": specs[len(specs) // 2] if specs else None,
        **figures,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model        {loaded.path}  ({describe_threads(threads)}, median of {args.repeat})")
    print(f"prefill      {out['prefill_tok_s']:.1f} tok/s ({args.prompt_tokens}-token prompt)")
    print(f"decode       {decode:.2f} tok/s = {decode / bound:.0%} of the {bound:.1f} tok/s bound "
          f"({sizes['dense_bytes_per_token'] / 1e6:.1f} MB dense + {sizes['expert_bytes_per_token'] / 1e6:.1f} MB "
          f"experts per token at {mem_gbs:.1f} GB/s memory read)")
    if specs:
        sp = out["speculative"]
        print(f"speculative  {sp['proposer']}: {sp['acceptance_rate']:.0%} of drafts accepted, "
              f"{sp['tokens_per_pass']:.2f} tokens per pass")
    if figures:
        c, io = figures["cache"], figures["io"]
        print(f"cache        hit rate {c['hit_rate']:.1%}, {read_per_token / 1e6:.1f} MB read per token; disk "
              f"{io['read_gb_s']:.2f} GB/s achieved of {disk_gbs:.2f} measured, p50 {io['latency_ms_p50']:.1f} ms, "
              f"p99 {io['latency_ms_p99']:.1f} ms")
    return 0
