"""One generation request, as every command sees it: what was asked, and the engine-owned state."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

import numpy as np

from ..sampling import Sampler, SamplingParams
from .stops import StopMatcher

_ids = itertools.count(1)


class Request:
    """A prompt to continue; `emit(event)` is called from the thread that runs the model.

    Events: {"type": "token", "id", "text", "logprob", "top"} per generated token, then exactly one of
    {"type": "done", "finish_reason", "prompt_tokens", "completion_tokens"} or
    {"type": "error", "message", "status"}.
    """

    def __init__(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, *, stops: list[str] = (),
                 stop_ids: Iterable[int] = (),
                 logprobs: int = 0, priority: str | None = None, grammar=None,
                 emit: Callable[[dict], None] = lambda ev: None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.params = params
        self.logprobs = logprobs  # top alternatives reported per token; 0 = none
        self.priority = priority  # scheduler: admission class
        self.cancelled = False  # set by the client side or shutdown
        self.emit = emit
        self.stopper = StopMatcher(list(stops))
        self.grammar = grammar  # engine.grammar.Grammar the reply must follow (JSON); None = free text
        self.stop_ids = frozenset(stop_ids)  # tokens that end this request besides the vocabulary's eos (chat: end of turn)
        self.tokens: list[int] = []
        self.submitted = time.monotonic()
        self.finish_reason: str | None = None
        self.error: Exception | None = None  # why the request failed (finish_reason "error")
        # Engine-owned state, created at admission (EngineCore.admit).
        self.cache = None
        self.sampler: Sampler | None = None
        self.decoder = None
        self.matcher = None  # engine.grammar.Matcher: where the reply is in `grammar`
        self.history: list[int] = []
        self.logits: np.ndarray | None = None  # (V,) for the next position; None while prefilling
        self.residual: tuple[np.ndarray, np.ndarray] | None = None  # (ids, probs): draw the next token from
        # this instead of `logits` (the correction after a rejected draft token)
        self.prefilled = 0  # prompt tokens already in the cache
        self.reused = 0  # of which copied from an earlier sequence's KV rows at admission (prefix cache)
        self.done = False
        self.spec = None  # engine.speculative.SpecState while speculation is on
        # Figures.
        self.prefill_s = 0.0  # time of the steps that ran its prompt
        self.decode_s = 0.0  # time of the steps after that
        self.passes = 0  # forward passes after the prefill
        self.drafted = 0  # draft tokens verified
        self.accepted = 0  # of which the target agreed with

    def sibling(self, params: SamplingParams, emit: Callable[[dict], None]) -> Request:
        """A fresh request asking what this one asks, with other sampling `params` (the server's `n` choices)."""
        return Request(self.prompt_ids, self.max_tokens, params, stops=self.stopper.stops, stop_ids=self.stop_ids,
                       logprobs=self.logprobs, priority=self.priority, grammar=self.grammar, emit=emit)

    @property
    def prefill_tok_s(self) -> float:
        return (len(self.prompt_ids) - self.reused) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second of the steps after the prefill (the first token comes from the prefill)."""
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0

    def speculative_figures(self, proposer: str, k: int) -> dict:
        return {"proposer": proposer, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
                "tokens_per_pass": round((len(self.tokens) - 1) / self.passes, 3) if self.passes else 0.0,
                "k": k}
