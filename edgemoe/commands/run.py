"""`edgemoe run`: generate from a prompt on the command line, streaming text, then the speed.

The prompt: -p TEXT, -f FILE, --prompt-ids, or stdin (`-p -`, or piped input with none of them); with none
of them on an interactive terminal, a built-in opening line (the README's first command shows the speed).
"""

from __future__ import annotations

import json
import sys

from ..config import add_config_arguments, config_from_args
from ..errors import UsageError


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text; '-' reads it from stdin (so does piped input without "
                                            "-p, -f or --prompt-ids)")
    src.add_argument("-f", "--file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_session_arguments(p)
    add_config_arguments(p)


def add_sampling_arguments(p) -> None:
    """The sampling flags (`run`, `chat`); unset ones take the config's `sampling` section."""
    p.add_argument("--temp", type=float, default=None, help="temperature; 0 = greedy (default: config's, 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="keep the K most likely tokens; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below M × the best one's probability "
                                                             "(default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=None, help="penalise the last 64 tokens; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: config's, random)")


DEFAULT_PROMPT = "Once upon a time"


def wants_stdin(args, stdin=None) -> bool:
    """Whether the prompt comes from stdin: `-p -`, or no prompt flag and stdin is not a terminal (a pipe, a
    file), as `echo ... | ollama run` and `cat ... | mlx_lm.generate --prompt -` read it."""
    stdin = sys.stdin if stdin is None else stdin
    if args.prompt == "-":
        return True
    if args.prompt is not None or args.file is not None or args.prompt_ids is not None:
        return False
    return stdin is not None and not getattr(stdin, "closed", False) and not stdin.isatty()


def read_prompt(data: bytes, where: str) -> str:
    """A prompt's bytes as text: UTF-8, one trailing newline dropped (as llama.cpp's -f does: `echo` and
    editors end the text with a newline that is not part of the prompt); a one-line UsageError otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                         "(iconv -t UTF-8) or give token ids with --prompt-ids") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        raise UsageError(f"{where} is empty; give the prompt text there, or with -p TEXT")
    return text


def read_prompt_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the prompt file {path}: {e.strerror or e}; pass a readable text file "
                         "with -f") from None
    return read_prompt(data, f"the prompt file {path}")


def _stdin_bytes() -> bytes:
    buf = getattr(sys.stdin, "buffer", None)  # a text stream without bytes under it (a test's StringIO)
    return buf.read() if buf is not None else sys.stdin.read().encode("utf-8")


def _prompt_ids(args, tokenizer, text: str | None) -> list[int]:
    """text: the prompt read from -f or stdin, else None (then -p, --prompt-ids or the default)."""
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if text is None and args.prompt is None:
        text = DEFAULT_PROMPT
        print(f"(no prompt given: continuing {text!r}; pass -p TEXT, -f FILE or pipe text in)", file=sys.stderr)
    elif text is None:
        text = args.prompt
    if tokenizer is None:
        raise UsageError("this model file carries no vocabulary, so text cannot be tokenized; use --prompt-ids")
    return tokenizer.encode(text)


def sampling_params(args, cfg):
    """The config's `sampling` section with the flags given on the command line on top."""
    import dataclasses

    params = cfg.sampling.params()
    flags = {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repeat_penalty": args.repeat_penalty, "seed": args.seed}
    return dataclasses.replace(params, **{k: v for k, v in flags.items() if v is not None}).validate()


def check_prompt(ids: list[int], max_tokens: int, vocab: int, n_ctx: int) -> None:
    from ..errors import ContextOverflowError

    if not ids:
        raise UsageError("the prompt is empty; give text with -p or ids with --prompt-ids")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if len(ids) + max_tokens > n_ctx:
        raise ContextOverflowError(
            f"prompt ({len(ids)} tokens) + {max_tokens} new tokens exceed the context of {n_ctx}; "
            "shorten the prompt, lower -n, or raise --ctx (up to the model's trained context)")


def main(args) -> int:
    from ..engine.core import run_to_end
    from ..engine.request import Request
    from ..engine.session import Session

    if args.n_predict < 1:
        raise UsageError(f"-n must be at least 1, got {args.n_predict}")
    text = read_prompt_file(args.file) if args.file is not None else None  # a bad file fails before the load
    from_stdin = wants_stdin(args)
    cfg = config_from_args(args)
    params = sampling_params(args, cfg)
    session = Session(args, cfg)
    try:
        tok = session.tokenizer
        if from_stdin:  # after the load: a missing model is reported even when stdin never ends
            text = read_prompt(_stdin_bytes(), "the prompt on stdin")
        ids = _prompt_ids(args, tok, text)
        check_prompt(ids, args.n_predict, session.loaded.args.vocab_size, session.n_ctx)
        if session.stream is None:  # load the compiled kernels before the clock starts (streaming keeps its
            session.warm_up()  # I/O figures clean)
        core = session.core()

        tops: list[list] = []

        def emit(ev: dict) -> None:
            if ev["type"] == "token" and not args.json:
                sys.stdout.write(ev["text"] if tok is not None else f"{ev['id']} ")
                sys.stdout.flush()
            elif ev["type"] == "token":
                tops.append([{"id": i, "logprob": lp} for i, lp in ev["top"]])

        req = run_to_end(core, Request(ids, args.n_predict, params, logprobs=5 if args.json else 0, emit=emit))
        if req.error is not None:
            sys.stdout.write("\n")
            raise req.error
        text = tok.decode(req.tokens) if tok is not None else ""
        streaming = session.stream_figures()
        spec = req.speculative_figures(core.proposer_name, session.spec.k_max) if core.gate is not None else None
    finally:
        session.close()
    if args.json:
        print(json.dumps({
            "model": session.model_path,
            "prompt_ids": req.prompt_ids,
            "token_ids": req.tokens,
            "text": text,
            "stop_reason": "eos" if req.finish_reason == "stop" else req.finish_reason,
            "top_logprobs": tops,
            "timings": {"prefill_tok_s": round(req.prefill_tok_s, 2), "decode_tok_s": round(req.decode_tok_s, 2),
                        "prefill_s": round(req.prefill_s, 4), "decode_s": round(req.decode_s, 4),
                        "prompt_tokens": len(req.prompt_ids), "generated_tokens": len(req.tokens)},
            "layout": session.layout(), "kv_cache": session.cache_type,
            "threads": session.thread_figures(core),
            "speculative": spec,
            **streaming,
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"prompt: {len(req.prompt_ids)} tokens, {req.prefill_tok_s:.1f} tok/s | "
              f"generation: {len(req.tokens)} tokens, {req.decode_tok_s:.1f} tok/s", file=sys.stderr)
        if spec is not None:
            print(f"speculative ({spec['proposer']}, k <= {spec['k']}): {spec['accepted']}/{spec['drafted']} drafts "
                  f"accepted ({spec['acceptance_rate']:.0%}), {spec['tokens_per_pass']:.2f} tokens per pass",
                  file=sys.stderr)
        if streaming:
            c, io, pf = streaming["cache"], streaming["io"], streaming["prefetch"]
            print(f"experts: cache hit rate {c['hit_rate']:.1%}, {c['bytes_read'] / 1e6:.1f} MB read at "
                  f"{io['read_gb_s']:.2f} GB/s (p50 {io['latency_ms_p50']:.2f} ms, p99 {io['latency_ms_p99']:.2f} ms, "
                  f"O_DIRECT {'on' if c['direct_io'] else 'off'}), prefetch {pf['used_in_time']}/{pf['issued']} "
                  "used in time", file=sys.stderr)
    return 0
