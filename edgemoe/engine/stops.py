"""Stop strings over streamed text: release only text that cannot turn out to be part of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feed decoded text piece by piece; get back what is safe to send, and whether a stop string matched.

    Text that ends with a prefix of some stop string is held back until the next piece decides; the text
    before a matched stop string is released and the stop string itself is never sent (OpenAI semantics).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add `text`; return the newly releasable text (possibly ""). After a match, always ""."""
        if self.stopped:
            return ""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(hits)]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """End of generation: release whatever was held back."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
