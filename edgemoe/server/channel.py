"""One request's events, from the engine thread to its handler on the event loop, handed over in batches.

The engine thread appends under a lock and wakes the loop only when the handler is waiting for events; while the
handler is busy (or pausing between stream writes, see app.STREAM_INTERVAL_S) events just pile up, and its next
`get` takes them all. A stream at a thousand tokens a second then costs the loop one wake-up and one socket write
per batch instead of per token — the loop and the engine's Python share one interpreter lock, so every
microsecond the loop spends is taken from the model's step.

    channel = Channel(loop)
    channel.put((index, event))      # any thread, the loop's own included
    for index, event in await channel.get(): ...
"""

from __future__ import annotations

import asyncio
import threading


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Channel:
    """Events of one request, oldest first; one reader (the request's handler)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._waiter: asyncio.Future | None = None  # set while the reader waits in `get`

    def put(self, item) -> None:
        """Append `item`; wakes the reader if it waits. Quietly drops it once the loop is closed (shutdown)."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the loop is gone
                pass

    async def get(self) -> list:
        """Every item put since the last call (at least one: waits for it)."""
        while True:
            with self._lock:
                if self._items:
                    items, self._items = self._items, []
                    return items
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:  # cancelled while waiting
                        self._waiter = None
