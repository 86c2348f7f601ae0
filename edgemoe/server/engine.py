"""The one thread that owns model state. A step: schedule → sample one token for each running request
→ one forward pass for all of them together with chunks of new prompts.

Each request keeps its own KVCache (sized to its prompt + max_tokens) and Sampler. The pass runs every
row with the same arithmetic whatever else is in it (Model.forward_batch), so outputs do not depend
on what else is running: greedy results equal `edgemoe run --temp 0`. Rows of one step that route to
the same expert share its read and its matrix product.

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
        self.logits: np.ndarray | None = None  # (V,) for the next position; None while prefilling
        self.prefilled = 0  # prompt tokens already in the cache
        self.done = False


class Engine:
    """Runs the model for every job on one thread.

    `prefill_chunk` bounds the prompt tokens one step takes (over all new requests), so a long prompt
    does not stall the running requests' tokens for its whole length.
    """

    def __init__(self, model, tokenizer, scheduler: Scheduler, metrics: Metrics | None = None,
                 prefill_chunk: int = 256):
        self.model = model
        self.prefill_chunk = prefill_chunk
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
                self._guarded(self._admit, job)
            self._step([job for job in plan.running if not job.done], n_waiting)

    def _guarded(self, fn, *args):
        # A failure in one request (a bug, a bad expert read) ends that request, never the server.
        job = args[0]
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the client and the log
            log.exception("request %d failed", job.id)
            self._fail(job, f"{type(e).__name__}: {e}")
            return None

    def _admit(self, job: Job) -> None:
        job.cache = self.model.new_cache(len(job.prompt_ids) + job.max_tokens)
        job.sampler = Sampler(job.params, self.model.args.vocab_size)
        if self.tokenizer is not None:
            from ..tokenizer import StreamDecoder

            job.decoder = StreamDecoder(self.tokenizer)
        job.history = list(job.prompt_ids)

    def _step(self, jobs: list[Job], n_waiting: int) -> None:
        """Sample a token for every job that has logits, then run those tokens and prompt chunks in one pass."""
        t0 = time.perf_counter()
        batch: list[tuple[Job, np.ndarray]] = []
        budget = self.prefill_chunk
        n_decode = n_prompt = 0
        for job in jobs:
            if job.logits is not None:
                tok = self._guarded(self._sample, job)
                n_decode += tok is not None
                if tok is not None and not job.done:
                    batch.append((job, np.asarray([tok], dtype=np.int64)))
            elif job.prefilled < len(job.prompt_ids) and budget > 0:  # still prefilling: the next chunk of its prompt
                chunk = job.prompt_ids[job.prefilled:job.prefilled + budget]
                budget -= len(chunk)
                n_prompt += len(chunk)
                batch.append((job, np.asarray(chunk, dtype=np.int64)))
        if batch:
            self._forward(batch)
        dt = time.perf_counter() - t0
        share = n_prompt / max(1, n_prompt + n_decode)  # the step's time, split by tokens
        if n_prompt:
            self.metrics.prefill(n_prompt, dt * share)
        self.metrics.step(n_decode, dt * (1 - share), n_waiting, len(self.scheduler.running))

    def _forward(self, batch: list[tuple[Job, np.ndarray]]) -> None:
        """One pass for the whole batch; if it fails, each job alone, so only the failing ones end."""
        try:
            logits = self.model.forward_batch([(ids, job.cache) for job, ids in batch])  # (B, V)
        except Exception as e:  # noqa: BLE001 - reported to the client and the log
            if len(batch) == 1:  # nothing to separate: that request fails
                log.exception("request %d failed", batch[0][0].id)
                self._fail(batch[0][0], f"{type(e).__name__}: {e}")
                return
            log.warning("a batched step failed; running its %d requests one by one", len(batch))
            for job, ids in batch:
                self._guarded(self._forward_one, job, ids)
            return
        for (job, ids), row in zip(batch, logits):
            self._took(job, ids, row)

    def _forward_one(self, job: Job, ids: np.ndarray) -> None:
        self._took(job, ids, self.model.forward_batch([(ids, job.cache)])[0])

    def _took(self, job: Job, ids: np.ndarray, logits: np.ndarray) -> None:
        """`ids` went through the model; `logits` (V,) are the prediction after its last token."""
        if job.prefilled < len(job.prompt_ids):
            job.prefilled += ids.shape[0]
            if job.prefilled < len(job.prompt_ids):
                return  # more prompt to go: these logits predict a prompt token
        job.logits = logits

    def _sample(self, job: Job) -> int | None:
        """Sample the next token from the job's logits and send it; ends the job at a stop. The token."""
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
        job.logits = None
        if reason is not None:
            self._end(job, reason)
        return tok

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
