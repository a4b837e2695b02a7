"""Turning a stream of token bytes into text chunks: UTF-8 safety and stop sequences.

Shared by every local backend, so each gets identical streaming semantics: a chunk never ends
inside a UTF-8 character, text is held back while it could be the start of a stop sequence, and
the stop sequence itself is never emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopMatcher:
    """Feeds text in, gives back what is safe to emit; ``stopped`` once a stop sequence appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = self._held_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of ``pending`` that begins some stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Text still held back when generation ends without a stop."""
        out, self.pending = self.pending, ""
        return out


class TokenTextStream:
    """Token bytes in, complete UTF-8 text out, stops applied."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def feed(self, data: bytes) -> str:
        return self.matcher.feed(self._decoder.decode(data))

    def finish(self) -> str:
        """Flush at the end: held text is released unless stopped. An incomplete UTF-8 tail (max_tokens
        cut a character that spans several tokens) is dropped, never turned into U+FFFD: the client gets
        the text the tokens so far fully spell."""
        self._decoder.reset()
        return "" if self.matcher.stopped else self.matcher.flush()
