"""What a slow start is doing, on stderr: loading a model, compiling the kernels on the first run.

A start that takes less than `delay_s` shows nothing, so scripts that read stderr see what they saw before.
A slower phase shows, on a terminal, a tqdm status line naming the phase and the time so far, cleared when
the start is done (the generated text follows on a clean line); elsewhere (a log file, a pipe) one line per
slow phase, as llama.cpp prints its load log. Never stdout: `run --json` keeps it clean. `serve` logs its
phases itself (one log line each) and turns this off.
"""

from __future__ import annotations

import sys
import threading
import time

POLL_S = 0.25  # how often the status line's clock ticks


class Phases:
    """`with Phases("loading model.gguf") as phase: phase("reading the index"); ...; phase("laying out")`.

    Calling the object starts the next phase. enabled=False shows nothing (a caller that reports itself).
    """

    def __init__(self, desc: str, *, enabled: bool = True, delay_s: float = 1.0, file=None):
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled and self.file is not None
        self.tty = self.enabled and _isatty(self.file)
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._what: str | None = None
        self._since = self._start  # when the current phase started
        self._told = False  # not a terminal: the current phase's line is written
        self._bar = None  # the tqdm status line, once a phase is slow (terminal only)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, what: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._what, self._since, self._told = what, time.monotonic(), False
            if self._bar is not None:
                self._show()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="edgemoe-progress", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                if self._stop.is_set() or time.monotonic() - self._since < self.delay_s:
                    continue
                if self.tty:
                    self._show()
                elif not self._told:
                    self._told = True
                    print(f"edgemoe: {self.desc}: {self._what}...", file=self.file, flush=True)

    def _show(self) -> None:
        """Draw the terminal's status line (the lock is held)."""
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(file=self.file, bar_format="{desc}", leave=False, dynamic_ncols=True)
        self._bar.set_description_str(f"{self.desc}: {self._what} [{time.monotonic() - self._start:.0f} s]")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()  # leave=False: the status line is erased
            self._bar = None

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
