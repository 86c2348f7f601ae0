"""The one thread that owns model state: step() = schedule → prefill the admitted → decode one token each.

Each request keeps its own KVCache (sized to its prompt + max_tokens) and Sampler, so outputs do not
depend on what else is running: greedy results equal `edgemoe run --temp 0`. A step calls
Model.forward once per running request; pushing all of a step's tokens through one forward pass (so
each expert is fetched once per step for the whole batch) is a later optimisation.

The HTTP side talks to the engine through `submit` / `cancel` / `shutdown` and receives events through
each job's `emit` callback, which it points at an asyncio queue (loop.call_soon_threadsafe).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np

from ..sampling import Sampler, SamplingParams, top_logprobs
from .metrics import Metrics
from .scheduler import Scheduler, ShuttingDown
from .stops import StopMatcher

log = logging.getLogger("edgemoe.server")
_ids = itertools.count(1)


class Job:
    """One request as the engine sees it; `emit(event)` is called from the engine thread.

    Events: {"type": "token", "id", "text", "logprob", "top"}, then exactly one of
    {"type": "done", "finish_reason", "prompt_tokens", "completion_tokens"} or {"type": "error", "message"}.
    """

    def __init__(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, *, stops: list[str] = (),
                 logprobs: int = 0, priority: str | None = None, emit: Callable[[dict], None] = lambda ev: None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.params = params
        self.logprobs = logprobs  # top alternatives reported per token; 0 = none
        self.priority = priority  # scheduler: admission class
        self.cancelled = False  # scheduler: set by the client side or shutdown
        self.emit = emit
        self.stopper = StopMatcher(list(stops))
        self.tokens: list[int] = []
        self.submitted = time.monotonic()
        # Engine-owned state, created at admission.
        self.cache = None
        self.sampler: Sampler | None = None
        self.decoder = None
        self.history: list[int] = []
        self.logits: np.ndarray | None = None  # (V,) for the next position
        self.done = False


class Engine:
    """Runs the model for every job on one thread."""

    def __init__(self, model, tokenizer, scheduler: Scheduler, metrics: Metrics | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.metrics = metrics or Metrics()
        self.eos_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self._cv = threading.Condition()
        self._closing = False
        self._stopped = False  # the engine thread has ended
        self._deadline = math.inf  # after shutdown: when running jobs get cancelled
        self._thread = threading.Thread(target=self._run, name="edgemoe-engine", daemon=True)

    # ------------------------------------------------------------------ called from other threads

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue a job; raises scheduler.QueueFull / ShuttingDown / UnknownClass."""
        with self._cv:
            if self._stopped:
                raise ShuttingDown("the engine is not running; the server is stopping or failed (see its log)")
            self.scheduler.submit(job)
            self.metrics.queue_length = self.scheduler.n_waiting
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves at the next step."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def shutdown(self, grace_s: float) -> None:
        """Admit nothing new, refuse the waiting jobs, let running ones finish for `grace_s`, then cancel them."""
        with self._cv:
            refused = self.scheduler.drain()
            self._closing = True
            self._deadline = time.monotonic() + grace_s
            self._cv.notify()
        for job in refused:
            job.emit({"type": "error", "message": "the server is shutting down; retry once it is back",
                      "status": 503})

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the engine stopped")
            raise
        finally:  # after a bug in the loop itself, fail every request rather than leave clients hanging
            with self._cv:
                self._stopped = True
                jobs = self.scheduler.running + self.scheduler.drain()
            for job in jobs:
                if not job.done:
                    self._fail(job, "the engine stopped; see the server log")

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.scheduler.has_work and not self._closing:
                    self._cv.wait()
                if self._closing and time.monotonic() >= self._deadline:
                    for job in self.scheduler.running:
                        job.cancelled = True
                if self._closing and not self.scheduler.has_work:
                    return
                plan = self.scheduler.schedule()
                n_waiting = self.scheduler.n_waiting
            for job in plan.dropped:
                self._end(job, "cancelled")
            for job in plan.admitted:
                self._guarded(self._prefill, job)
            t0 = time.perf_counter()
            n = 0
            for job in plan.running:
                if not job.done:
                    n += self._guarded(self._decode, job) or 0
            self.metrics.step(n, time.perf_counter() - t0, n_waiting, len(self.scheduler.running))

    def _guarded(self, fn, job: Job):
        # A failure in one request (a bug, a bad expert read) ends that request, never the server.
        try:
            return fn(job)
        except Exception as e:  # noqa: BLE001 - reported to the client and the log
            log.exception("request %d failed", job.id)
            self._fail(job, f"{type(e).__name__}: {e}")
            return 0

    def _prefill(self, job: Job) -> None:
        t0 = time.perf_counter()
        job.cache = self.model.new_cache(len(job.prompt_ids) + job.max_tokens)
        job.sampler = Sampler(job.params, self.model.args.vocab_size)
        if self.tokenizer is not None:
            from ..tokenizer import StreamDecoder

            job.decoder = StreamDecoder(self.tokenizer)
        job.history = list(job.prompt_ids)
        job.logits = self.model.forward(np.asarray(job.prompt_ids, dtype=np.int64), job.cache)[-1]  # (V,)
        self.metrics.prefill(len(job.prompt_ids), time.perf_counter() - t0)

    def _decode(self, job: Job) -> int:
        """Sample the next token from the job's logits, send it, and run it through the model unless done."""
        logits = job.logits  # (V,)
        top, chosen_lp = None, None
        if job.logprobs:
            top = top_logprobs(logits, job.logprobs)
        tok = job.sampler.sample(logits, job.history)
        if job.logprobs:
            x = logits.astype(np.float64)  # (V,)
            m = x.max()
            chosen_lp = float(x[tok] - m - math.log(np.exp(x - m).sum()))
        job.history.append(tok)
        job.tokens.append(tok)
        piece = job.decoder.push(tok) if job.decoder is not None else ""
        text = job.stopper.push(piece)
        reason = "stop" if job.stopper.stopped or tok in self.eos_ids else None
        if reason is None and len(job.tokens) >= job.max_tokens:
            reason = "length"
        if reason is not None and not job.stopper.stopped:
            if job.decoder is not None:
                text += job.stopper.push(job.decoder.flush())
            text += job.stopper.flush()
            if job.stopper.stopped:
                reason = "stop"
        job.emit({"type": "token", "id": tok, "text": text, "logprob": chosen_lp, "top": top})
        if reason is not None:
            self._end(job, reason)
            return 1
        job.logits = self.model.forward(np.asarray([tok], dtype=np.int64), job.cache)[-1]
        return 1

    def _end(self, job: Job, reason: str) -> None:
        self._release(job)
        self.metrics.request_done("cancelled" if reason == "cancelled" else "ok")
        job.emit({"type": "done", "finish_reason": reason, "prompt_tokens": len(job.prompt_ids),
                  "completion_tokens": len(job.tokens)})

    def _fail(self, job: Job, message: str) -> None:
        self._release(job)
        self.metrics.request_done("error")
        job.emit({"type": "error", "message": message, "status": 500})

    def _release(self, job: Job) -> None:
        job.done = True
        job.cache = job.logits = None  # the KV cache is the big allocation; drop it now
        with self._cv:
            if job in self.scheduler.running:
                self.scheduler.finish(job)
