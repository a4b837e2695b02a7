"""Degenerate repetition: a run of the same n-gram, token after token, that a small model never leaves.

A greedy small model that starts repeating itself (``\\tag{1}\\n \\tag{2}\\n ...``, the same line
over and over, ``\\n\\n\\n``) repeats until ``max_tokens``. The detector watches token ids and says
when the last tokens are one unit of ``p`` tokens (``1 <= p <= max_period``) repeated over a long
span. Two kinds of run count:

* **exact**: the same tokens again and again;
* **counting**: the same tokens with only the numbers changing (``\\tag{7}``, ``\\tag{8}``...),
  but only when the unit has a word in it. A list ``1, 2, 3, ... 50`` repeats only numbers and
  punctuation and is spared.

A run must cover ``min_span`` tokens and ``min_repeats`` units before it counts (a counting run
twice that), so a table whose rows share column text, a dozen identical lines of code, or a
dozen worked steps ("Step 7: add 7, giving 28.") pass.

* **long**: a whole paragraph (``max_period < p <= max_long_period`` tokens) written out exactly
  ``long_repeats`` times: a ChainOfThought reasoning of 110 tokens that ends by starting itself
  over ran to ``max_tokens`` before this. Two identical functions or blocks pass.

One step costs ``O(max_period)`` plus the earlier places of the same token within
``max_long_period``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: token classes: numbers are all alike for the "counting" comparison
NUMBER = -1


class TokenClasses:
    """Per token id: is it a number, does it hold a letter (from the token's bytes, looked up lazily)."""

    def __init__(self, pieces: Sequence[bytes] | Callable[[int], bytes]) -> None:
        self._piece = pieces if callable(pieces) else pieces.__getitem__
        self._cache: dict[int, tuple[bool, bool]] = {}

    def _classes(self, token: int) -> tuple[bool, bool]:
        found = self._cache.get(token)
        if found is None:
            try:
                piece = self._piece(token)
            except (IndexError, KeyError, ValueError):
                piece = b""
            body = piece.strip()
            found = (bool(body) and body.isdigit(),
                     any(b >= 128 or chr(b).isalpha() for b in piece))
            self._cache[token] = found
        return found

    def normalized(self, token: int) -> int:
        return NUMBER if self._classes(token)[0] else token

    def has_word(self, token: int) -> bool:
        return self._classes(token)[1]


class LoopDetector:
    """Feed tokens one by one; ``looping`` turns true once a degenerate run is long enough."""

    def __init__(self, classes: TokenClasses, *, max_period: int = 40, min_span: int = 96,
                 min_repeats: int = 6, counting: bool = True, max_long_period: int = 160,
                 long_repeats: int = 3) -> None:
        self.classes = classes
        self.counting_runs = counting
        self.max_period = max_period
        self.min_span = min_span
        self.min_repeats = min_repeats
        self.max_long_period = max(max_long_period, max_period)
        self.long_repeats = long_repeats
        self.reset()

    def reset(self) -> None:
        """Forget the history (a new string field starts)."""
        self.tokens: list[int] = []
        self.norm: list[int] = []
        # per period p: how many consecutive latest positions i have tokens[i] == tokens[i - p]
        self.exact = [0] * (self.max_period + 1)
        self.counting = [0] * (self.max_period + 1)
        self.places: dict[int, list[int]] = {}  # token -> the indexes it stands at (long periods)
        self.long_runs: dict[int, tuple[int, int]] = {}  # long period p -> (last index of its run, run length)
        self.looping = False
        self.period = 0

    def feed(self, token: int) -> bool:
        """Add one token; returns ``looping``."""
        self.tokens.append(token)
        self.norm.append(self.classes.normalized(token))
        n = len(self.tokens)
        for p in range(1, min(self.max_period, n - 1) + 1):
            self.exact[p] = self.exact[p] + 1 if self.tokens[-1] == self.tokens[-1 - p] else 0
            self.counting[p] = self.counting[p] + 1 if self.norm[-1] == self.norm[-1 - p] else 0
            if not self.looping and self._degenerate(p):
                self.looping, self.period = True, p
        i, places = n - 1, self.places.setdefault(token, [])
        for j in reversed(places):  # only periods at which this token repeats can extend a run
            p = i - j
            if p > self.max_long_period:
                break
            if p <= self.max_period:
                continue
            last, run = self.long_runs.get(p, (-2, 0))
            run = run + 1 if last == i - 1 else 1
            self.long_runs[p] = (i, run)
            if run >= (self.long_repeats - 1) * p and not self.looping:
                self.looping, self.period = True, p
        places.append(i)
        return self.looping

    def _degenerate(self, p: int) -> bool:
        need = max(self.min_span, self.min_repeats * p)
        if self.exact[p] + p >= need:
            return True
        if self.counting_runs and self.counting[p] + p >= 2 * need:  # counting needs twice the span
            unit = self.tokens[-p:]
            return any(self.classes.has_word(t) for t in unit) and any(
                self.classes.normalized(t) == NUMBER for t in unit)
        return False


def find_loop(tokens: Sequence[int], classes: TokenClasses, **limits: int) -> int | None:
    """The index after which ``tokens`` became a degenerate loop, or None (for tests and post-hoc checks)."""
    detector = LoopDetector(classes, **limits)
    for i, token in enumerate(tokens):
        if detector.feed(token):
            return i + 1
    return None
