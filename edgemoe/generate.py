"""Prompt → tokens: one batched prefill pass, then one token at a time, with timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextOverflowError, UsageError
from .models.mixtral import Model
from .sampling import Sampler, top_logprobs


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes after the prefill
    stop_reason: str = "length"  # "length" | "eos"

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


def generate(model: Model, prompt_ids: list[int], max_tokens: int, sampler: Sampler, *, n_ctx: int,
             eos_ids: set[int] = frozenset(), on_token: Callable[[int], None] | None = None,
             logprobs: int = 0) -> Generation:
    """Generate up to `max_tokens` tokens after `prompt_ids`, stopping at an end-of-sequence token."""
    if not prompt_ids:
        raise UsageError("the prompt is empty; give text with -p or ids with --prompt-ids")
    vocab = model.args.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if len(prompt_ids) + max_tokens > n_ctx:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + {max_tokens} new tokens exceed the context of {n_ctx}; "
            "shorten the prompt, lower -n, or raise --ctx (up to the model's trained context)")
    gen = Generation(prompt_ids=list(prompt_ids))
    cache = model.new_cache(n_ctx)
    history = list(prompt_ids)

    t0 = time.perf_counter()
    logits = model.forward(np.asarray(prompt_ids, dtype=np.int64), cache)[-1]  # (V,)
    gen.prefill_s = time.perf_counter() - t0
    for step in range(max_tokens):
        if logprobs:
            gen.top_logprobs.append(top_logprobs(logits, logprobs))
        tok = sampler.sample(logits, history)
        gen.token_ids.append(tok)
        history.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos_ids:
            gen.stop_reason = "eos"
            break
        if step + 1 == max_tokens:
            break
        t0 = time.perf_counter()
        logits = model.forward(np.asarray([tok], dtype=np.int64), cache)[-1]
        gen.decode_s += time.perf_counter() - t0
        gen.decode_steps += 1
    return gen
