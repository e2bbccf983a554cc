"""`StopChecker`: stop-string detection on streamed text, with hold-back across pieces and trimming.

Text reaches a client piece by piece, and a stop string may straddle pieces ("...\\nUs" + "er:"). So the
checker never releases a tail that could still grow into a stop string: it holds back the longest suffix of
the text seen so far that is a proper prefix of some stop string, and releases it once the next piece shows
it is not one (or at the end of the stream). When a stop string appears, everything from its first character
on is dropped: the client sees the text before it and learns which stop string matched.

The inference loop applies one checker per request; `astrai.serve` re-exports this class and never
re-implements it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Finds the first of `stop` in a stream of text pieces and trims the output before it."""

    def __init__(self, stop: Sequence[str] | None = None):
        stops = list(stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop={stops!r}: every stop sequence must be a non-empty string")
        self.stops: tuple[str, ...] = tuple(stops)
        self.matched: str | None = None  # the stop string found, once found
        self._held = ""  # released text never includes this tail: it may be the start of a stop string
        self._max_hold = max((len(s) for s in stops), default=1) - 1

    @property
    def held(self) -> str:
        """Text received but not released yet."""
        return self._held

    def check(self, text: str) -> str | None:
        """The stop string that starts earliest in `text` (the first listed on a tie), or None."""
        found = self._find(text)
        return None if found is None else found[1]

    def push(self, text: str) -> str:
        """Take the next piece; return the text that is now safe to emit.

        Once a stop string has matched, `matched` is set, the returned text ends just before it, and every
        later piece is swallowed (returns "").
        """
        if self.matched is not None:
            return ""
        buffer = self._held + text
        found = self._find(buffer)
        if found is not None:
            index, self.matched = found
            self._held = ""
            return buffer[:index]
        hold = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """End of stream: the held-back tail can no longer become a stop string, so release it."""
        text, self._held = self._held, ""
        return "" if self.matched is not None else text

    def _find(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stops:
            index = text.find(s)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, s)
        return best

    def _partial_suffix(self, text: str) -> int:
        # Length of the longest suffix of `text` that a stop string starts with (at most max(len(stop)) - 1).
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
