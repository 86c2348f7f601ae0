"""The one request lifecycle: admit → steps → end, for `run`, `bench`, the REPL and the server alike.

A step, for the requests given (the scheduler's running batch, or the one request of `run`):
  1. every request with logits samples its next token (or, after a rejected draft, draws it from the
     corrected distribution) and sends it; stop strings, end-of-sequence and the length limit end it;
  2. the speculation gate chooses a proposer and k for each request still running, the proposers draft;
  3. ONE forward pass carries every request's sampled token with its drafts, and chunks of new prompts
     (at most `prefill_chunk` prompt tokens); each expert is read and applied once for all rows;
  4. drafts are verified against the pass's logits (engine/accept.py) and accepted tokens sent; the KV
     caches (target and draft) forget rejected positions.
Rows get the same bits whatever else is in the pass (Model.forward_batch), so greedy output is the same
with or without speculation, alone or in a batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from ..errors import EdgeMoEError, NumericalError
from ..sampling import Sampler, top_logprobs
from .accept import verify_token
from .filewatch import ModelFiles
from .gate import Gate, SpecState
from .prefix_cache import PrefixCache
from .proposers import Draft
from .request import Request
from .threads import ThreadGovernor

log = logging.getLogger("edgemoe.engine")


class EngineCore:
    """Runs requests' steps on the calling thread; every event goes out through the request's `emit`."""

    def __init__(self, model, tokenizer, *, prefill_chunk: int = 256, gate: Gate | None = None, metrics=None,
                 on_end: Callable[[Request], None] = lambda req: None, verify_packs: bool = True,
                 prefix_cache: PrefixCache | None = None, threads: ThreadGovernor | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.gate = gate  # None: no speculation
        self.metrics = metrics
        self.on_end = on_end  # called once a request has ended (the server frees its batch slot)
        self.prefix_cache = prefix_cache  # KV rows of recent sequences for prompt reuse; None: prefill every prompt
        self.threads = threads  # chooses each pass's thread count; None: the count set on the thread stays
        self.eos_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self._emitted = 0  # tokens sent in the current step (sampled + accepted drafts)
        # memory-mapped model files: packs verified now (ssd.verify_checksums), watched before every step
        self.files = ModelFiles.of(model, gate, verify_packs=verify_packs)

    @property
    def proposer_name(self) -> str:
        if self.gate is None:
            return "off"
        names = [p.name for p in self.gate.proposers]
        return names[0] if len(names) == 1 else "auto(" + ",".join(names) + ")"

    # ------------------------------------------------------------------ lifecycle

    def admit(self, req: Request) -> None:
        """Create the request's KV cache, sampler and detokeniser (and its proposers' state)."""
        req.cache = self.model.new_cache(len(req.prompt_ids) + req.max_tokens)
        if req.grammar is not None:
            req.matcher = req.grammar.matcher()
        req.sampler = Sampler(req.params, self.model.args.vocab_size, n_prompt=len(req.prompt_ids), mask=req.matcher)
        if self.tokenizer is not None:
            from ..tokenizer import StreamDecoder

            req.decoder = StreamDecoder(self.tokenizer)
        req.history = list(req.prompt_ids)
        if self.prefix_cache is not None:  # the shared prefix's rows are copied, the rest is prefilled
            req.reused = req.prefilled = self.prefix_cache.fill(req.prompt_ids, req.cache)
            self.prefix_cache.track(req.id, req.history, req.cache)
            if self.metrics is not None and req.reused:
                self.metrics.prompt_reused(req.reused)
        if self.gate is not None:
            req.spec = SpecState()
            for p in self.gate.proposers:
                p.start(req)

    def end(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.release(req)
        if self.metrics is not None:
            self.metrics.request_done("cancelled" if reason == "cancelled" else "ok")
        req.emit({"type": "done", "finish_reason": reason, "prompt_tokens": len(req.prompt_ids),
                  "completion_tokens": len(req.tokens)})

    def fail(self, req: Request, message: str) -> None:
        req.finish_reason = "error"
        self.release(req)
        if self.metrics is not None:
            self.metrics.request_done("error")
        req.emit({"type": "error", "message": message, "status": 500})

    def release(self, req: Request) -> None:
        """Free the request's state (KV caches, its proposers' state) without sending an event."""
        if req.done:
            return
        if self.prefix_cache is not None:  # an ended request's rows are kept for the next prompts; a failed one's not
            self.prefix_cache.release(req.id, keep=req.finish_reason not in (None, "error"))
        req.done = True
        if req.spec is not None:
            for p in self.gate.proposers:
                p.release(req)
        req.cache = req.logits = req.residual = None  # the KV cache is the big allocation; drop it now
        self.on_end(req)

    def guarded(self, fn, req: Request, *args):
        """fn(req, *args); a failure (a bug, a bad expert read) ends that request, never the caller."""
        try:
            return fn(req, *args)
        except Exception as e:  # noqa: BLE001 - reported to the client and the log
            self._failed(req, e)
        return None

    def _failed(self, req: Request, e: Exception) -> None:
        req.error = e
        if isinstance(e, EdgeMoEError):  # a known cause: one line in the log, its message to the client
            log.error("request %d failed: %s", req.id, e)
            self.fail(req, str(e))
        else:
            log.exception("request %d failed", req.id)
            self.fail(req, f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ the step

    def step(self, reqs: list[Request], n_waiting: int = 0, n_running: int | None = None) -> None:
        changed = self.files.check()
        if changed is not None:  # a mapped file shrank or was replaced: reading it could SIGBUS
            for req in reqs:
                if not req.done:
                    req.error = changed
                    self.fail(req, str(changed))
            return
        t0 = time.perf_counter()
        batch: list[tuple[Request, np.ndarray, Draft | None]] = []
        budget = self.prefill_chunk
        decoding: list[Request] = []
        prefilling: list[Request] = []
        n_prompt = 0
        for req in reqs:
            if req.done:
                continue
            if req.logits is not None:
                tok = self.guarded(self._sample, req)
                if tok is not None and not req.done:
                    decoding.append(req)
            elif req.prefilled < len(req.prompt_ids) and budget > 0:
                chunk = req.prompt_ids[req.prefilled:req.prefilled + budget]
                budget -= len(chunk)
                n_prompt += len(chunk)
                prefilling.append(req)
                batch.append((req, np.asarray(chunk, dtype=np.int64), None))
        drafts = self._draft(decoding, len(decoding) + n_prompt) if decoding and self.gate is not None else {}
        for req in decoding:
            d = drafts.get(req.id)
            ids = [req.history[-1]] + (d.tokens if d is not None else [])
            batch.append((req, np.asarray(ids, dtype=np.int64), d))
        if batch:
            rows = sum(ids.shape[0] for _, ids, _ in batch)
            if self.threads is not None:
                self.threads.before(rows, prompt=n_prompt > 0)
            tf = time.perf_counter()
            self._forward(batch)
            tf = time.perf_counter() - tf
            if self.threads is not None:
                self.threads.after(rows, tf)
            if self.gate is not None and not prefilling:  # decode rows only: prompt chunks are another regime
                self.gate.costs.record(rows, tf)
        dt = time.perf_counter() - t0
        for req in prefilling:
            req.prefill_s += dt
        for req in decoding:
            req.decode_s += dt
        if self.gate is not None and decoding:
            self.gate.step_done(self._emitted, dt)
        if self.metrics is not None:
            share = n_prompt / max(1, n_prompt + self._emitted)  # the step's time, split by tokens
            if n_prompt:
                self.metrics.prefill(n_prompt, dt * share)
            self.metrics.step(self._emitted, dt * (1 - share), n_waiting,
                              n_running if n_running is not None else len(reqs))
        self._emitted = 0

    def _draft(self, decoding: list[Request], base_rows: int) -> dict[int, Draft]:
        """Each decoding request's drafts for this step from the gate's active proposer, by request id."""
        proposer = self.gate.active_proposer
        if proposer is None:
            return {}
        reqs, ks = [], []
        for req in decoding:
            if req.matcher is not None:  # drafts would need masks at positions the matcher has not reached: no drafts
                continue
            k = self.gate.choose(req.spec, base_rows, req.max_tokens - len(req.tokens))
            if k > 0:
                base_rows += k
                reqs.append(req)
                ks.append(k)
        if not reqs:
            return {}
        t0 = time.perf_counter()
        try:
            drafts = proposer.propose(reqs, ks)
        except Exception:  # noqa: BLE001 - speculation is an optimisation: decode plainly instead
            log.exception("the %s proposer failed; these requests decode without drafts this step", proposer.name)
            for req in reqs:
                proposer.rollback(req)
            return {}
        self.gate.record_draft(proposer.name, proposer.rounds, time.perf_counter() - t0)
        out: dict[int, Draft] = {}
        for req, d in zip(reqs, drafts):
            if d.tokens:
                d.proposer = proposer
                out[req.id] = d
                continue
            if proposer.rounds:  # a model ran and was unsure at once: a rejected trial for the gate
                self.gate.record(req.spec, proposer.name, 0, 0)
            proposer.rollback(req)  # nothing proposed: plain decoding
        return out

    def _forward(self, batch: list[tuple[Request, np.ndarray, Draft | None]]) -> None:
        """One pass for the whole batch; if it fails, each request alone, so only the failing ones end."""
        rows = [ids.shape[0] if d is not None else 1 for _, ids, d in batch]
        try:
            logits = self.model.forward_batch([(ids, req.cache) for req, ids, _ in batch], rows=rows)  # (R, V)
        except Exception as e:  # noqa: BLE001 - reported to the client and the log
            if len(batch) == 1:
                self._failed(batch[0][0], e)
                return
            log.warning("a batched step failed; running its %d requests one by one", len(batch))
            for item, n in zip(batch, rows):
                self.guarded(self._forward_one, item[0], item[1], item[2], n)
            return
        at = 0
        for (req, ids, d), n in zip(batch, rows):
            self.guarded(self._took, req, ids, logits[at:at + n], d)
            at += n

    def _forward_one(self, req: Request, ids: np.ndarray, d: Draft | None, n: int) -> None:
        self._took(req, ids, self.model.forward_batch([(ids, req.cache)], rows=[n]), d)

    def _took(self, req: Request, ids: np.ndarray, logits: np.ndarray, d: Draft | None) -> None:
        """`ids` went through the model; `logits` (n, V) predict what follows each of its last n tokens."""
        if not np.isfinite(logits).all():
            raise NumericalError(f"the model computed NaN or infinite logits at position {len(req.history)}: its "
                                 "weights are corrupt or out of range; check the model file (edgemoe-doctor --model)")
        if req.prefilled < len(req.prompt_ids):
            req.prefilled += ids.shape[0]
            if req.prefilled < len(req.prompt_ids):
                return  # more prompt to go: these logits predict a prompt token
            req.logits = logits[-1]
            return
        req.passes += 1
        if d is None:
            req.logits = logits[0]
            return
        accepted = 0
        for i, tok in enumerate(d.tokens):
            ok, corrected = verify_token(req.sampler, logits[i], req.history, tok, d.q[i])
            if not ok:
                req.logits, req.residual = logits[i], corrected
                break
            accepted += 1
            self._commit(req, tok, logits[i])
            if req.done:
                break
        else:
            req.logits = logits[len(d.tokens)]
        req.drafted += len(d.tokens)
        req.accepted += accepted
        if self.metrics is not None:
            self.metrics.speculative(len(d.tokens), accepted)
        if req.done:
            return
        self.gate.record(req.spec, d.proposer.name, len(d.tokens), accepted)
        req.cache.truncate(len(req.history))
        d.proposer.rollback(req)

    def _sample(self, req: Request) -> int | None:
        """Draw the next token from the request's logits (or its corrected distribution) and commit it."""
        logits = req.logits  # (V,)
        if req.residual is not None:
            tok = req.sampler.draw(*req.residual)
            req.residual = None
        else:
            tok = req.sampler.sample(logits, req.history)
        req.logits = None
        self._commit(req, tok, logits)
        return tok

    def _commit(self, req: Request, tok: int, logits: np.ndarray) -> None:
        """`tok` is the request's next token (`logits` (V,) the target's prediction for it): send it, maybe end."""
        top, chosen_lp = None, None
        if req.logprobs:
            top = top_logprobs(logits, req.logprobs)
            x = logits.astype(np.float64)  # (V,)
            m = x.max()
            chosen_lp = float(x[tok] - m - math.log(np.exp(x - m).sum()))
        req.history.append(tok)
        req.tokens.append(tok)
        self._emitted += 1
        piece = req.decoder.push(tok) if req.decoder is not None else ""
        text = req.stopper.push(piece)
        reason = "stop" if req.stopper.stopped or tok in self.eos_ids or tok in req.stop_ids else None
        if req.matcher is not None and reason is None:
            req.matcher.consume(tok)
            if req.matcher.stopped:  # the JSON is complete: only end-of-sequence may follow, which needs no pass
                reason = "stop"
        if reason is None and len(req.tokens) >= req.max_tokens:
            reason = "length"
        if reason is not None and not req.stopper.stopped:
            if req.decoder is not None:
                text += req.stopper.push(req.decoder.flush())
            text += req.stopper.flush()
            if req.stopper.stopped:
                reason = "stop"
        req.emit({"type": "token", "id": tok, "text": text, "logprob": chosen_lp, "top": top})
        if reason is not None:
            self.end(req, reason)


def run_to_end(core: EngineCore, req: Request) -> Request:
    """Admit `req` and step it alone until it ends (`run`, `bench`, the REPL's local mode)."""
    core.admit(req)
    while not req.done:
        if req.cancelled:
            core.end(req, "cancelled")
            break
        core.step([req])
    return req


def generate(model, prompt_ids: list[int], max_tokens: int, params, *, tokenizer=None, gate: Gate | None = None,
             eos: bool = True, grammar=None) -> Request:
    """One request through a fresh core: a tool's or a test's shortcut to the same lifecycle as `run`.
    eos=False ignores end-of-sequence tokens (always `max_tokens` tokens); `grammar` constrains the reply."""
    core = EngineCore(model, tokenizer, gate=gate)
    if not eos:
        core.eos_ids = set()
    return run_to_end(core, Request(prompt_ids, max_tokens, params, grammar=grammar))
