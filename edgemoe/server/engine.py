"""The one thread that owns model state: it drives the shared engine core (engine/core.py) step after step
for the scheduler's running batch.

Each request keeps its own KV cache (sized to its prompt + max_tokens) and sampler. The pass runs every
row with the same arithmetic whatever else is in it (Model.forward_batch), so outputs do not depend on
what else is running: greedy results equal `edgemoe run --temp 0`, with or without speculation. The core's
prefix cache (engine/prefix_cache.py) lives on this thread too: a new request starts from the KV rows of
the longest prompt prefix it shares with an ended or running request, bit-identical to prefilling them.

The HTTP side talks to the engine through `submit` / `cancel` / `shutdown` and receives events through
each request's `emit` callback, which it points at an asyncio queue (loop.call_soon_threadsafe).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from ..engine.core import EngineCore
from ..engine.request import Request
from .scheduler import Scheduler, ShuttingDown

log = logging.getLogger("edgemoe.server")


class Engine:
    """Runs the model for every request on one thread.

    `make_core(on_end)` builds the EngineCore on the engine thread itself (after `bind_thread`, which
    applies the thread count there: Numba's count is per thread).
    """

    def __init__(self, core: EngineCore, scheduler: Scheduler, bind_thread: Callable[[], None] = lambda: None):
        self.core = core
        core.on_end = self._finished
        self.metrics = core.metrics
        if self.metrics is not None and core.prefix_cache is not None:  # /health and /metrics show its size
            self.metrics.prompt_cache = core.prefix_cache.figures
        self.scheduler = scheduler
        self.bind_thread = bind_thread
        self.threads = None  # Numba's thread count on the engine thread, once it runs
        self._cv = threading.Condition()
        self._closing = False
        self._stopped = False  # the engine thread has ended
        self._deadline = math.inf  # after shutdown: when running requests get cancelled
        self._thread = threading.Thread(target=self._run, name="edgemoe-engine", daemon=True)

    # ------------------------------------------------------------------ called from other threads

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        """The engine thread runs and can serve: False too once a memory-mapped model file changed on disk
        (every request then fails; /health says 503 and the watchdog stops, so systemd restarts us)."""
        return self._thread.is_alive() and self.core.files.check() is None

    def submit(self, req: Request) -> None:
        """Queue a request; raises scheduler.QueueFull / ShuttingDown / UnknownClass."""
        with self._cv:
            if self._stopped:
                raise ShuttingDown("the engine is not running; the server is stopping or failed (see its log)")
            self.scheduler.submit(req)
            if self.metrics is not None:
                self.metrics.queue_length = self.scheduler.n_waiting
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: the request leaves at the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def shutdown(self, grace_s: float) -> None:
        """Admit nothing new, refuse the waiting requests, let running ones finish for `grace_s`, then cancel them."""
        with self._cv:
            refused = self.scheduler.drain()
            self._closing = True
            self._deadline = time.monotonic() + grace_s
            self._cv.notify()
        for req in refused:
            req.emit({"type": "error", "message": "the server is shutting down; retry once it is back",
                      "status": 503})

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            self.bind_thread()
            import numba

            self.threads = numba.get_num_threads()
            self._loop()
        except BaseException:
            log.exception("the engine stopped")
            raise
        finally:  # after a bug in the loop itself, fail every request rather than leave clients hanging
            with self._cv:
                self._stopped = True
                reqs = self.scheduler.running + self.scheduler.drain()
            for req in reqs:
                if not req.done:
                    self.core.fail(req, "the engine stopped; see the server log")

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.scheduler.has_work and not self._closing:
                    self._cv.wait()
                if self._closing and time.monotonic() >= self._deadline:
                    for req in self.scheduler.running:
                        req.cancelled = True
                if self._closing and not self.scheduler.has_work:
                    return
                plan = self.scheduler.schedule()
                n_waiting = self.scheduler.n_waiting
            for req in plan.dropped:
                if not req.done:
                    self.core.end(req, "cancelled")
            for req in plan.admitted:
                self.core.guarded(self.core.admit, req)
            running = [req for req in plan.running if not req.done]
            self.core.step(running, n_waiting, len(self.scheduler.running))

    def _finished(self, req: Request) -> None:
        with self._cv:
            if req in self.scheduler.running:
                self.scheduler.finish(req)
