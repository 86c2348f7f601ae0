"""`edgemoe run`: generate from a prompt on the command line, streaming text, then the speed."""

from __future__ import annotations

import json
import sys

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
    if args.model is None:
        from ..default_model import default_model_path

        args.model = default_model_path()
    loaded = load_model(args.model)
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

            stream = StreamDecoder(tok)

            def on_token(t: int) -> None:
                sys.stdout.write(stream.push(t))
                sys.stdout.flush()
        else:
            def on_token(t: int) -> None:
                sys.stdout.write(f"{t} ")
                sys.stdout.flush()

    gen = generate(loaded.model, ids, args.n_predict, sampler, n_ctx=n_ctx, eos_ids=eos, on_token=on_token,
                   logprobs=5 if args.json else 0)
    text = tok.decode(gen.token_ids) if tok is not None else ""
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
        }, ensure_ascii=False))
    else:
        if tok is not None:
            sys.stdout.write(stream.flush())
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"prompt: {len(gen.prompt_ids)} tokens, {gen.prefill_tok_s:.1f} tok/s | "
              f"generation: {len(gen.token_ids)} tokens, {gen.decode_tok_s:.1f} tok/s", file=sys.stderr)
    return 0
