"""The fused decode kernels compiled by a background process when Numba's cache lacks them.

Each fused block (`fused`) is one large parallel kernel per pair of weight kinds, and compiling the four of a
model takes ~30-40 s on a small box: a first start would spend most of its time there. A model whose
`compile_wait` is off asks `ready()` before it runs a block; when the kernel is neither compiled in this
process nor in Numba's on-disk cache, the block runs kernel by kernel instead (the same serial kernels: the
same bits), and the kernel's signature goes to one worker process that compiles it into the cache. The first
call after the worker has stored a kernel loads it from there, so a long-running process (`serve`, `chat`)
switches to the fused blocks on its own, and a short `run` leaves them to the next start.

    parent                                              worker (python -m edgemoe.kernels.compile_ahead)
    ready(kernel, key, args, state) -> False  ──job──▶  nice 19; one-token blocks first; under a file lock
    (next calls: ready once reported)         ◀─job──   (several starts compile each kernel once) compile
                                                        into Numba's cache
    a job: (the kernel's key, its pickled Numba signature)

The worker has its own session (a terminal's Ctrl-C does not reach it), reads keys until the parent's end
of the pipe closes, and finishes its queue even after the parent has exited.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading

log = logging.getLogger(__name__)

_worker: _Worker | None = None
_lock = threading.Lock()


class _Worker:
    """The parent's end: the worker process, the jobs sent to it and the ones it has reported. A job is
    (key, signature): the key names the kernel, the pickled Numba signature says what to compile."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.asked: set = set()
        self.done: set = set()
        self.failed: dict = {}
        self._partial = b""

    def ask(self, job: tuple) -> None:
        if job in self.asked:
            return
        self.asked.add(job)
        try:
            self.proc.stdin.write(json.dumps([list(job[0]), job[1]]).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # the worker is gone: the block stays unfused
            self.failed[job] = "the compile worker exited"

    def poll(self) -> None:
        """Take in what the worker has reported since the last call (never blocks)."""
        try:
            data = self.proc.stdout.read()
        except OSError:
            data = None
        if not data:
            if self.proc.poll() is not None:  # gone: whatever it has not reported will not come
                for job in self.asked - self.done - set(self.failed):
                    self.failed[job] = f"the compile worker exited with status {self.proc.returncode}"
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            status, key, sig, why = json.loads(raw)
            job = (tuple(key), sig)
            if status == "done":
                self.done.add(job)
            else:
                self.failed[job] = why
                log.warning("compiling the fused kernel %s in the background failed (%s); it keeps running kernel "
                            "by kernel", "/".join(job[0]), why)


def ready(kernel, key: tuple, args: tuple, state: dict) -> bool:
    """Whether `kernel` (a Numba dispatcher, `key` naming it) can run on `args` now without compiling: it is
    compiled in this process or stored in Numba's cache (then loaded here). Otherwise its compilation is
    handed to the worker, and False until the worker reports it.

    state: the caller's own, kept across calls (key -> True once ready, False once failed, else its pending
    job): the signature of `args` is worked out once per key (it costs more than a block), so a caller's calls
    must agree on it."""
    got = state.get(key)
    if got is True or got is False:  # ready, or failed for good
        return got
    global _worker
    with _lock:
        if got is None:  # first call: compiled here or in the cache, else a job for the worker
            sig = _signature(args)
            if _load(kernel, sig):
                state[key] = True
                return True
            if _worker is None:
                _worker = _Worker()
            got = state[key] = (key, base64.b64encode(pickle.dumps(sig)).decode())
            _worker.ask(got)
            return False
        _worker.poll()
        if got in _worker.failed:
            state[key] = False  # stays unfused; no more polling for it
            return False
        if got not in _worker.done:
            return False
        if not _load(kernel, pickle.loads(base64.b64decode(got[1]))):
            _worker.failed[got] = "not in Numba's cache after compiling"
            state[key] = False
            log.warning("the fused kernel %s was compiled in the background but is not in Numba's cache (is its "
                        "directory writable? NUMBA_CACHE_DIR sets it); it keeps running kernel by kernel",
                        "/".join(key))
            return False
        log.info("the fused kernel %s compiled in the background is in use", "/".join(key))
        state[key] = True
        return True


def _signature(args: tuple) -> tuple:
    import numba

    return tuple(numba.typeof(a) for a in args)


def _load(kernel, sig: tuple) -> bool:
    """Load `kernel`'s overload for `sig` from Numba's cache into this process if it is there."""
    if sig in kernel.overloads:
        return True
    if kernel._cache.load_overload(sig, kernel.targetctx) is None:
        return False
    kernel.compile(sig)  # registers it (loading it again from the cache)
    return True


def pending() -> tuple[int | None, list[str]]:
    """(the worker's pid, the kernels it is still compiling for this process); (None, []) without one."""
    with _lock:
        if _worker is None:
            return None, []
        _worker.poll()
        left = _worker.asked - _worker.done - set(_worker.failed)
        return _worker.proc.pid, sorted({"/".join(key) for key, _ in left})


# The worker.

PRIORITY = ("moe", "attention", "moe_rows", "attention_seqs")  # decode's one-token blocks first


def _lock_path() -> str:
    """One lock per Numba cache (NUMBA_CACHE_DIR, else the package's own): workers wait on it before they
    import the compiler, so a queue of them costs little memory."""
    where = os.environ.get("NUMBA_CACHE_DIR") or tempfile.gettempdir()
    return os.path.join(where, f"edgemoe-compile-{os.getuid()}.lock")


def _reader(queue: list, cond: threading.Condition) -> None:
    """Move the parent's lines into `queue` until its end closes (then append None)."""
    for raw in sys.stdin.buffer:
        key, sig = json.loads(raw)
        with cond:
            queue.append((tuple(key), sig))  # unpickled after the lock: it imports Numba
            cond.notify()
    with cond:
        queue.append(None)
        cond.notify()


def _report(status: str, key: tuple, sig: str, why: str = "") -> None:
    try:
        sys.stdout.write(json.dumps([status, list(key), sig, why]) + "\n")
        sys.stdout.flush()
    except OSError:  # the parent has exited: the kernel is in the cache for the next start
        pass


def _compile(key: tuple, sig: str) -> None:
    import fcntl

    os.makedirs(os.path.dirname(_lock_path()), exist_ok=True)
    with open(_lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another start's worker may be compiling the same kernel
        from . import fused
        from .kinds import KINDS

        block, k1, k2 = key
        by_name = {k.name: k for k in KINDS.values()}
        kernel = fused.kernel_for(block, by_name[k1], by_name[k2])
        kernel.compile(pickle.loads(base64.b64decode(sig)))  # loaded if another worker stored it, else compiled


def main() -> None:
    try:
        os.nice(19)  # the parent's decode keeps the cores it wants
    except OSError:
        pass
    queue: list = []
    cond = threading.Condition()
    threading.Thread(target=_reader, args=(queue, cond), daemon=True).start()
    closed = False
    while True:
        with cond:
            while not queue and not closed:
                cond.wait()
            if None in queue:
                closed = True
                queue.remove(None)
            if not queue:
                return  # the parent's end is closed and everything it asked for is done
            key, sig = min(queue, key=lambda q: PRIORITY.index(q[0][0]) if q[0][0] in PRIORITY else len(PRIORITY))
            queue.remove((key, sig))
        try:
            _compile(key, sig)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which keeps the block unfused
            _report("failed", key, sig, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            _report("done", key, sig)


if __name__ == "__main__":
    main()
