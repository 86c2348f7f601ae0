"""Atomic counters for work shared inside one parallel region (`fused`).

A fused kernel splits each phase of its work into chunks. Every thread claims chunks with
`claim` (one `fetch_add` on the phase's claim counter), adds one to the phase's done counter after each chunk,
and before the next phase waits until that counter has reached the phase's chunk count. Waiting on
finished chunks, not on arriving threads, cannot deadlock however the region's iterations are mapped
to threads (on one thread the first iteration simply does every chunk), and a thread the scheduler
holds back only leaves its remaining chunks to the others.

    sync: int64 array of zeros, `SYNC_SLOTS` per phase; the counters of phase p sit at
    p * SYNC_SLOTS (claimed) and p * SYNC_SLOTS + 8 (done), 64 bytes apart.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .intrinsics import _call, _is_flat, _ptr

SYNC_SLOTS = 16  # int64 per phase: two counters on their own cache lines
_I64 = ir.IntType(64)


def _is_i64(arr) -> bool:
    return _is_flat(arr) and arr.dtype == types.int64


@intrinsic
def fetch_add(typingctx, arr, off, value):
    """Atomically add `value` to the int64 arr[off]; the value before (sequentially consistent)."""
    if not (_is_i64(arr) and isinstance(off, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I64)
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", p, v, "seq_cst")

    return types.int64(arr, off, value), codegen


@intrinsic
def load_acquire(typingctx, arr, off):
    """The int64 arr[off], read atomically with acquire ordering (writes made before the matching
    `fetch_add` by another thread are visible after it)."""
    if not (_is_i64(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I64)
        return builder.load_atomic(p, "acquire", 8)

    return types.int64(arr, off), codegen


@intrinsic
def spin_pause(typingctx):
    """A spin-wait hint to the CPU (x86 `pause`; nothing elsewhere)."""

    def codegen(context, builder, sig, args):
        if llvm.get_process_triple().startswith(("x86_64", "i686", "i386")):
            _call(builder, "llvm.x86.sse2.pause", ir.VoidType(), [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, nogil=True, inline="always")
def claim(sync, phase, n_chunks, from_back):
    """An unclaimed chunk of `phase` (0 .. n_chunks - 1), or -1 once all are claimed.

    Chunks go out from the front (0, 1, ...) or, with `from_back`, from the back (n - 1, n - 2, ...),
    so two threads each read one sequential stream of weights until they meet. The claim counter
    packs both counts (front in the low 32 bits) so one atomic add decides each claim.
    """
    old = fetch_add(sync, phase * SYNC_SLOTS, (1 << 32) if from_back else 1)
    front = old & 0xFFFFFFFF
    back = old >> 32
    if front + back >= n_chunks:
        return -1
    return n_chunks - 1 - back if from_back else front


@njit(cache=True, nogil=True, inline="always")
def finish(sync, phase):
    """Count one chunk of `phase` as done (after its results are written)."""
    fetch_add(sync, phase * SYNC_SLOTS + 8, 1)


@njit(cache=True, nogil=True)
def wait_done(sync, phase, n_chunks):
    """Return once all `n_chunks` chunks of `phase` are done."""
    while load_acquire(sync, phase * SYNC_SLOTS + 8) < n_chunks:
        spin_pause()
