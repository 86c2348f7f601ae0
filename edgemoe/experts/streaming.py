"""Experts streamed from the file on demand into a budgeted RAM cache, with look-ahead prefetch.

Only the engine thread touches the cache, and the memory of an evicted blob is reused only once no view
of it is left, so the experts of one step stay valid together; reader threads only fill I/O buffers.
Predictions come for the next `depth` layers (a prediction d layers ahead reads at priority PREFETCH + d - 1,
behind every nearer one); a layer predicted again from a later hidden state adds to what is in flight.
Prefetched buffers wait in `_pending` until the engine's request for that layer: those it asks for are used
(in time, or late if the read is still running), the others are wasted.

A read that failed (after the reader's own retries) fails the pass that needed it, and nothing of it is kept:
the store drops that pass's other demand reads and every failed prefetch, so the next pass reads afresh.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ..kernels.layouts import repack_x8, x8_eligible
from ..qtensor import QTensor, row_bytes
from .cache import ExpertCache
from .extents import ExpertExtent
from .io import ExpertReader
from .read_jobs import DEMAND, PREFETCH, ReadHandle
from .store import Expert, with_gate_up

SPILL_SHARE = 1 / 8  # spill buffers kept for reuse: at most this share of the cache's budget on top of it


@dataclass
class PrefetchStats:
    issued: int = 0  # prefetch reads queued
    used_in_time: int = 0  # demanded after its read had finished
    used_late: int = 0  # demanded while its read was still queued or running
    wasted: int = 0  # not demanded by the next pass through its layer
    skipped_busy: int = 0  # predictions not issued because the disk queue or buffer pool was full
    paused: int = 0  # predictions not issued while backed off after poor recent accuracy
    enabled: bool = True
    depth: int = 1  # layers ahead predicted
    by_depth: dict = field(default_factory=dict)  # d → [issued, used in time, used late, wasted]

    def count(self, d: int, what: int) -> None:
        self.by_depth.setdefault(d, [0, 0, 0, 0])[what] += 1

    def as_dict(self) -> dict:
        done = self.used_in_time + self.used_late + self.wasted
        return {"issued": self.issued, "used_in_time": self.used_in_time, "used_late": self.used_late,
                "wasted": self.wasted, "skipped_busy": self.skipped_busy, "paused": self.paused,
                "accuracy": round((self.used_in_time + self.used_late) / done, 4) if done else None,
                "enabled": self.enabled, "depth": self.depth,
                "by_depth": {d: dict(zip(("issued", "used_in_time", "used_late", "wasted"), c))
                             for d, c in sorted(self.by_depth.items())}}


ISSUED, IN_TIME, LATE, WASTED = range(4)  # PrefetchStats.by_depth columns


class Backoff:
    """Pauses one depth's prefetch when its recent predictions were mostly wrong: a prefetch yields to demand
    reads, but a wrong one still holds a buffer and the disk between them. After a pause it probes again."""

    WINDOW = 32  # outcomes judged together
    MIN_USEFUL = 0.4  # fraction used (in time or late: a late one still started early) below which it pauses
    PAUSE = 256  # hints skipped before probing again

    def __init__(self):
        self.outcomes: list[bool] = []
        self.pause_left = 0

    def record(self, useful: bool) -> None:
        self.outcomes.append(useful)
        if len(self.outcomes) >= self.WINDOW:
            if sum(self.outcomes) < self.MIN_USEFUL * len(self.outcomes):
                self.pause_left = self.PAUSE
            self.outcomes.clear()

    def allow(self) -> bool:
        if self.pause_left > 0:
            self.pause_left -= 1
            return False
        return True


def _x8_eligible(part) -> bool:
    return x8_eligible(part.qtype, part.rows)


def _x8_offsets(ext: ExpertExtent) -> dict[str, int] | None:
    """Where gate, up and down go in an expert's repacked blob: gate and up adjacent (one stacked
    matrix) when both are Q4_0 or Q4_K of one type and shape; None keeps the parts where they were read."""
    g, u, d = (ext.parts[p] for p in ("gate", "up", "down"))
    if not (_x8_eligible(g) and _x8_eligible(u) and (g.qtype, g.rows, g.cols) == (u.qtype, u.rows, u.cols)):
        return None
    n = g.rows * row_bytes(g.qtype, g.cols)
    return {"gate": 0, "up": n, "down": 2 * n}


def _interleave_into(ext: ExpertExtent, src, dst: np.ndarray) -> None:
    """Write an expert's parts from `src` (its Buffer as read) into `dst` (as large), x8-eligible
    parts in the 8-row interleaved layout, at the offsets `_x8_offsets` gives (else where they were)."""
    offsets = _x8_offsets(ext)
    for name, part in ext.parts.items():
        rb = row_bytes(part.qtype, part.cols)
        n = part.rows * rb
        at = part.offset if offsets is None else offsets[name]
        data = src.view(part.offset, n)  # zero-copy: a part lies inside one read range
        if _x8_eligible(part):
            repack_x8(part.qtype, data.reshape(part.rows, rb), dst[at:at + n].reshape(part.rows // 8, 8 * rb))
        else:
            dst[at:at + n] = data


class StreamingExperts:
    """ExpertStore whose experts live on disk; `get` returns them from the cache or reads them."""

    def __init__(self, extents: list[list[ExpertExtent]], reader: ExpertReader, cache: ExpertCache, *,
                 prefetch: bool = True, depth: int = 1, checksums: dict | None = None):
        self.extents = extents  # [layer][expert]
        self.reader = reader
        self.cache = cache
        self.checksums = checksums or {}
        self.n_layers = len(extents)
        self.n_experts = max((len(x) for x in extents), default=0)  # a dense layer has none
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1 (prefetch=False turns prefetch off), got {depth}")
        self.prefetch = PrefetchStats(enabled=prefetch, depth=depth)
        self._backoff = {d: Backoff() for d in range(1, depth + 1)}  # nearer predictions are judged apart
        self._demanded: dict[tuple[int, int], ReadHandle] = {}  # issued by request(), consumed by get()
        self._pending: dict[tuple[int, int], tuple[ReadHandle, int]] = {}  # prefetches not yet demanded, with
        # the depth of the prediction that issued them
        self._spills: list[np.ndarray] = []  # memory for experts the cache did not keep, reused once unreferenced
        self._x8 = False  # parts of the types in layouts.X8 are repacked into the 8-row interleaved layout as they arrive

    def repack_x8(self) -> None:
        """From now on keep matrices of the types in layouts.X8 (rows divisible by 8) in the 8-row interleaved layout."""
        self._x8 = True

    @property
    def wants_hints(self) -> bool:
        return self.prefetch.enabled

    @property
    def hint_depth(self) -> int:
        return self.prefetch.depth if self.prefetch.enabled else 0

    def _read(self, key, priority) -> ReadHandle:
        ext = self.extents[key[0]][key[1]]
        return self.reader.read(key, ext.ranges, priority=priority, checksum=self.checksums.get(key))

    def request(self, layer: int, experts) -> None:
        """Queue demand reads for every listed expert not in RAM, so the disk works while the first computes;
        this layer's prefetches of other experts were wrong and are dropped."""
        wanted = {(layer, int(e)) for e in experts}
        wrong = [k for k in self._pending if k[0] == layer and k not in wanted]
        if wrong:
            self.reader.cancel_prefetches(wrong)  # those not started yet cost the disk nothing
            for key in wrong:
                handle, d = self._pending.pop(key)
                handle.release()
                self._judge(d, WASTED)
        for e in experts:
            key = (layer, int(e))
            old = self._demanded.get(key)
            if old is not None and old.failed():  # left by a pass that stopped before its get(): read afresh
                del self._demanded[key]
                old.release()
            if key in self._demanded or self.cache.contains(key):
                continue
            if key in self._pending:
                continue  # its prefetch is promoted when get() asks for it
            self._demanded[key] = self._read(key, DEMAND)

    def hint(self, layer: int, experts, depth: int = 1) -> None:
        """A prediction, made `depth` layers before it, that `experts` of `layer` (most likely first) come next:
        prefetch those not in RAM, unless the disk queue or the buffer pool is full."""
        if not self.prefetch.enabled or layer >= self.n_layers or depth > self.prefetch.depth:
            return
        if not self._backoff[depth].allow():
            self.prefetch.paused += 1
            return
        st = self.reader.stats
        for key in dict.fromkeys((layer, int(e)) for e in experts):  # in the order given: most likely first
            if key in self._pending or key in self._demanded or self.cache.contains(key):
                continue
            # Never compete with demand reads: skip when reads are already queued or buffers run short.
            if st.queued > st.queue_depth or self.reader.pool_free() < 2:
                self.prefetch.skipped_busy += 1
                continue
            self._pending[key] = (self._read(key, PREFETCH + depth - 1), depth)
            self.prefetch.issued += 1
            self.prefetch.count(depth, ISSUED)

    def _judge(self, depth: int, outcome: int) -> None:
        if outcome == WASTED:
            self.prefetch.wasted += 1
        elif outcome == IN_TIME:
            self.prefetch.used_in_time += 1
        else:
            self.prefetch.used_late += 1
        self.prefetch.count(depth, outcome)
        self._backoff[depth].record(outcome != WASTED)

    def get(self, layer: int, expert: int) -> Expert:
        key = (layer, expert)
        ext = self.extents[layer][expert]
        blob = self.cache.get(key)
        if blob is None:
            handle = self._demanded.pop(key, None)
            if handle is None:
                pre, depth = self._pending.pop(key, (None, 0))
                if pre is not None and pre.failed():  # a failed prediction fails nothing: demand it afresh
                    pre.release()
                    self._judge(depth, WASTED)
                    pre = None
                if pre is not None:
                    if pre.done():
                        self._judge(depth, IN_TIME)
                        handle = pre
                    else:
                        self._judge(depth, LATE)
                        handle = self._read(key, DEMAND)  # joins the running read and promotes a queued one
                        pre.release()
                else:
                    handle = self._read(key, DEMAND)
            try:
                buf = handle.result()
            except BaseException:
                handle.release()
                self._forget()
                raise
            try:
                if self._x8:  # repacked straight into the cache, each part from its own read range
                    fill = lambda dst: _interleave_into(ext, buf, dst)  # noqa: E731
                else:  # the bytes as they are: one copy, whatever the ranges
                    fill = lambda dst: buf.copy(out=dst)  # noqa: E731
                blob = self.cache.put_with(key, ext.nbytes, fill)
                if blob is None:  # larger than the cache, or its tier is full of pinned experts
                    blob = self._spill_buffer(ext.nbytes)
                    fill(blob)
            finally:
                buf.release()
        return self._expert(ext, blob)

    def _spill_buffer(self, nbytes: int) -> np.ndarray:
        """Memory for an expert the cache did not keep (too large, or not admitted): a buffer of an earlier one
        that no expert refers to any more, else a new one. A batched step may hold several at once; reusing their
        pages saves the kernel's zeroing of fresh ones (~1.5 ms per 6 MB here). The buffers kept come on top of
        the cache's budget, at most SPILL_SHARE of it."""
        for arr in self._spills:
            if arr.nbytes == nbytes and sys.getrefcount(arr) == 3:  # the list, `arr` and the call's argument
                return arr
        arr = np.empty(nbytes, np.uint8)
        if (len(self._spills) + 1) * nbytes <= self.cache.capacity_bytes * SPILL_SHARE:
            self._spills.append(arr)
        return arr

    def _forget(self) -> None:
        """A read failed and its pass is abandoned: drop the pass's other demand reads and every failed
        prefetch, so no error outlives it (the next pass asks again and joins reads still running)."""
        for h in self._demanded.values():
            h.release()
        self._demanded.clear()
        for key in [k for k, (h, _) in self._pending.items() if h.failed()]:
            handle, d = self._pending.pop(key)
            handle.release()
            self._judge(d, WASTED)

    def resident(self, layer: int) -> np.ndarray:
        return np.fromiter((self.cache.contains((layer, e)) for e in range(self.n_experts)), bool, self.n_experts)

    def in_ram(self) -> _InRam:
        return _InRam(self)

    def _expert(self, ext: ExpertExtent, blob: np.ndarray) -> Expert:
        offsets = _x8_offsets(ext) if self._x8 else None
        mats = {p: self._view(blob, part.offset if offsets is None else offsets[p], part)
                for p, part in ext.parts.items()}
        if offsets is None:
            return Expert(mats["gate"], mats["up"], mats["down"])
        g = ext.parts["gate"]  # gate and up stacked: one x8 matrix
        gate_up = QTensor(blob[:offsets["down"]].reshape(g.rows // 4, -1), g.qtype, 2 * g.rows, g.cols, 8)
        return with_gate_up(gate_up, mats["down"])

    def _view(self, blob: np.ndarray, at: int, part) -> QTensor:
        """The matrix `part` stored at blob[at:], in the x8 layout if this store repacks it."""
        rb = row_bytes(part.qtype, part.cols)
        data = blob[at:at + part.rows * rb]
        if self._x8 and _x8_eligible(part):
            return QTensor(data.reshape(part.rows // 8, 8 * rb), part.qtype, part.rows, part.cols, 8)
        return QTensor(data.reshape(part.rows, rb), part.qtype, part.rows, part.cols)

    def stats(self) -> dict:
        return {"cache": self.cache.stats(), "io": self.reader.stats.as_dict(), "prefetch": self.prefetch.as_dict()}

    def close(self) -> None:
        for h in [h for h, _ in self._pending.values()] + list(self._demanded.values()):
            h.release()
        self._pending.clear()
        self._demanded.clear()
        self.reader.close()


class _InRam:
    """StreamingExperts as a self-draft sees it: only what is cached, touched without counting."""

    wants_hints = False
    hint_depth = 0

    def __init__(self, store: StreamingExperts):
        self._store = store

    def request(self, layer: int, experts) -> None:
        pass

    def hint(self, layer: int, experts, depth: int = 1) -> None:
        pass

    def get(self, layer: int, expert: int) -> Expert:
        blob = self._store.cache.peek((layer, expert))
        if blob is None:
            raise KeyError(f"expert {expert} of layer {layer} left the cache during a draft pass")
        return self._store._expert(self._store.extents[layer][expert], blob)
