"""`edgemoe run`: generate from a prompt on the command line, streaming text, then the speed."""

from __future__ import annotations

import json
import sys

from ..config import add_config_arguments, config_from_args
from ..errors import UsageError


def setup_arg_parser(p) -> None:
    p.add_argument("-m", "--model", help="GGUF file or HF checkpoint directory (default: the embedded model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below M × the best one's probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalise the last 64 tokens; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: min(model's, 4096))")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="stream experts from the file into a RAM cache of this many MB (default: memory-map all)")
    p.add_argument("--no-prefetch", action="store_true", help="with streaming: do not prefetch predicted experts")
    p.add_argument("--stream", action="store_true", help="stream experts with the config's cache tiers")
    add_config_arguments(p)


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    text = args.prompt if args.prompt is not None else "Once upon a time"
    if tokenizer is None:
        raise UsageError("this model file carries no vocabulary, so text cannot be tokenized; use --prompt-ids")
    return tokenizer.encode(text)


def main(args) -> int:
    from .. import kernels
    from ..generate import generate
    from ..loader import load_model
    from ..sampling import Sampler, SamplingParams

    if args.n_predict < 1:
        raise UsageError(f"-n must be at least 1, got {args.n_predict}")
    params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, seed=args.seed)
    params.validate()
    if args.threads is not None:
        kernels.set_threads(args.threads)
    stream = None
    if args.cache_mb is not None or args.stream or args.config or args.overrides:
        from ..experts.setup import StreamOptions

        cfg = config_from_args(args)
        apply_dispatch(cfg)
        if args.model is None:
            args.model = cfg.inference.model
        if args.threads is None and cfg.threads is not None:
            kernels.set_threads(cfg.threads)
        stream = StreamOptions.from_config(cfg, args.cache_mb, prefetch=not args.no_prefetch)
    if args.model is None:
        from ..default_model import default_model_path

        args.model = default_model_path()
    loaded = load_model(args.model, stream)
    governor = None
    if stream is not None:
        from ..thermal import ThermalGovernor

        governor = ThermalGovernor.from_config(loaded.model.experts.reader, cfg, args.model)
        if governor.sensor is not None:  # no sensor (VMs, most SD cards): nothing to govern
            governor.start()
    tok = loaded.tokenizer
    ids = _prompt_ids(args, tok)
    n_ctx = args.ctx or min(loaded.args.max_position_embeddings, 4096)
    if n_ctx < 1:
        raise UsageError(f"--ctx must be positive, got {n_ctx}")
    sampler = Sampler(params, loaded.args.vocab_size)
    eos = set(tok.eos_ids) if tok is not None else set()

    on_token = None
    if not args.json:
        if tok is not None:
            from ..tokenizer import StreamDecoder

            decoder = StreamDecoder(tok)

            def on_token(t: int) -> None:
                sys.stdout.write(decoder.push(t))
                sys.stdout.flush()
        else:
            def on_token(t: int) -> None:
                sys.stdout.write(f"{t} ")
                sys.stdout.flush()

    if stream is None:  # load the compiled kernels before the clock starts (streaming keeps its I/O figures clean)
        import numpy as np

        warm = loaded.model.new_cache(3)
        loaded.model.forward(np.asarray(ids[:1] * 2), warm)  # matrix kernels (prompt)
        loaded.model.forward(np.asarray(ids[:1]), warm)  # vector kernels (decode)
    gen = generate(loaded.model, ids, args.n_predict, sampler, n_ctx=n_ctx, eos_ids=eos, on_token=on_token,
                   logprobs=5 if args.json else 0)
    text = tok.decode(gen.token_ids) if tok is not None else ""
    streaming = stream_figures(loaded.model.experts)
    if governor is not None:
        governor.stop()
        streaming["thermal"] = governor.status()
    if args.json:
        print(json.dumps({
            "model": loaded.path,
            "prompt_ids": gen.prompt_ids,
            "token_ids": gen.token_ids,
            "text": text,
            "stop_reason": gen.stop_reason,
            "top_logprobs": [[{"id": i, "logprob": lp} for i, lp in step] for step in gen.top_logprobs],
            "timings": {"prefill_tok_s": round(gen.prefill_tok_s, 2), "decode_tok_s": round(gen.decode_tok_s, 2),
                        "prefill_s": round(gen.prefill_s, 4), "decode_s": round(gen.decode_s, 4),
                        "prompt_tokens": len(gen.prompt_ids), "generated_tokens": len(gen.token_ids)},
            **streaming,
        }, ensure_ascii=False))
    else:
        if tok is not None:
            sys.stdout.write(decoder.flush())
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"prompt: {len(gen.prompt_ids)} tokens, {gen.prefill_tok_s:.1f} tok/s | "
              f"generation: {len(gen.token_ids)} tokens, {gen.decode_tok_s:.1f} tok/s", file=sys.stderr)
        if streaming:
            c, io, pf = streaming["cache"], streaming["io"], streaming["prefetch"]
            print(f"experts: cache hit rate {c['hit_rate']:.1%}, {c['bytes_read'] / 1e6:.1f} MB read at "
                  f"{io['read_gb_s']:.2f} GB/s (p50 {io['latency_ms_p50']:.2f} ms, p99 {io['latency_ms_p99']:.2f} ms, "
                  f"O_DIRECT {'on' if c['direct_io'] else 'off'}), prefetch {pf['used_in_time']}/{pf['issued']} "
                  "used in time", file=sys.stderr)
    loaded.model.experts.close()
    return 0


def stream_figures(experts) -> dict:
    """The `cache`, `io` and `prefetch` figures of a streaming store ({} for memory-mapped experts)."""
    if not hasattr(experts, "stats"):
        return {}
    st = experts.stats()
    c, io = st["cache"], st["io"]
    return {
        "cache": {"hit_rate": round(c["hit_rate"], 4), "hits": c["hits"], "misses": c["misses"],
                  "evictions": c["evictions"], "bytes_read": io["bytes_read"], "direct_io": io["direct_io"],
                  "resident_bytes": experts.cache.resident_bytes},
        "io": {"read_gb_s": round(io["gbps"], 3), "latency_ms_p50": round(io["p50_ms"], 3),
               "latency_ms_p99": round(io["p99_ms"], 3), "reads": io["reads"], "merged_reads": io["merged_reads"],
               "degraded_reads": io["degraded_reads"]},
        "prefetch": st["prefetch"],
    }


def apply_dispatch(cfg) -> None:
    """Force the kernel variants that `compute.dispatch` names (auto leaves the CPU's best)."""
    from ..kernels import dispatch

    for qtype, variant in vars(cfg.compute.dispatch).items():
        if variant not in (None, "auto"):
            dispatch.force_variant(variant, qtype)
