"""Prompt lookup drafting: propose what followed the last earlier occurrence of the current tail.

Costs microseconds per step and no model, and when an answer copies its input (a code edit, a
quoted passage) it drafts long runs the target accepts. The index is updated incrementally, one
dict write per n-gram size per token, so lookups stay O(1) however long the context grows.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass


class PromptLookup:
    """An n-gram index over one token sequence (prompt, then generated tokens as they are accepted)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        # per n: n-gram -> index of the token that followed its most recent occurrence
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}

    def reset(self, tokens: Iterable[int] = ()) -> None:
        self.tokens = []
        for table in self._next.values():
            table.clear()
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        seq = self.tokens
        for token in tokens:
            j = len(seq)
            for n, table in self._next.items():
                if j >= n:
                    table[tuple(seq[j - n:j])] = j
            seq.append(token)

    def propose(self, k: int, ahead: Sequence[int] = ()) -> tuple[list[int], int]:
        """Up to ``k`` tokens to draft, and the n-gram size that matched (0: nothing matched).

        ``ahead``: tokens already drafted past the indexed ones, so the tail to match is theirs.
        The longest n-gram wins: a 3-token match predicts the continuation better than a 1-token one.
        """
        tail = [*self.tokens[-self.max_ngram:], *ahead][-self.max_ngram:] if ahead else self.tokens
        size = len(tail)
        if k <= 0:
            return [], 0
        for n in range(min(self.max_ngram, size), self.min_ngram - 1, -1):
            start = self._next[n].get(tuple(tail[size - n:]))
            if start is not None:
                return self.tokens[start:start + k], n
        return [], 0


#: a line that starts with a label (``Reporter: ``) holds one field of a record
LABEL = re.compile(rb"[A-Z][A-Za-z0-9 ._/()-]{0,30}:(?: |\\n|$)")


@dataclass(frozen=True)
class Copy:
    """What :meth:`TextLookup.propose` found: tokens to draft and how much to trust them."""

    tokens: list[int]
    matched: int = 0  # bytes of the output's end found in the source (0: no match)
    unique: bool = False  # the matched text occurs once in its source
    anchored: bool = False  # found first after where the last long match ended (answers copy in order)
    #: the copy ends where a value may end: the punctuation there (b"" for none), then b"\n" when a
    #: line (or the source) ends there too; None: the window ended first
    stop: bytes | None = None


class TextLookup:
    """Prompt lookup on text: find the longest end of the output's text in the prompt's text and
    propose the prompt's continuation, tokenized afresh.

    Token n-grams miss where an answer copies a span but tokenizes its first word differently (a
    JSON value opens with ``"Open`` where the prompt had `` Open``); the text still matches after one
    token, so a copied value is drafted from its second token on. A short match that occurs more than
    once is taken from just after the last long match: extraction answers mostly copy in the
    order of the text.
    """

    def __init__(self, encode: Callable[[bytes], list[int]], min_bytes: int = 3, max_bytes: int = 32,
                 bytes_per_token: int = 6, anchor_bytes: int = 6, anchor_reach: int = 200) -> None:
        self.encode = encode
        self.min_bytes, self.max_bytes, self.bytes_per_token = min_bytes, max_bytes, bytes_per_token
        self.anchor_bytes, self.anchor_reach = anchor_bytes, anchor_reach
        self.sources: tuple[bytes, ...] = ()
        self.line_ends: tuple[tuple[int, ...], ...] = ()
        self.cursor: list[int] = []  # per source: where the last long match ended

    @property
    def source(self) -> bytes:
        return self.sources[0] if self.sources else b""

    def reset(self, *sources: bytes, line_ends: Sequence[Sequence[int]] = ()) -> None:
        """The texts an answer copies from, the likelier rendering first (e.g. the prompt with its
        line breaks as spaces, then as written): a match of equal length is taken from the earlier.
        ``line_ends``: per source, the offsets where a line of the original text ended (a rendering
        that joined its lines with spaces cannot show them)."""
        kept = [(s, tuple(line_ends[i]) if i < len(line_ends) else ()) for i, s in enumerate(sources) if s]
        self.sources = tuple(s for s, _ in kept)
        self.line_ends = tuple(e for _, e in kept)
        self.cursor = [0] * len(self.sources)

    def _find(self, i: int, key: bytes) -> tuple[int, bool]:
        """Where ``key`` occurs in source ``i``: first after the cursor, else last; and whether that is
        close after the cursor (within ``anchor_reach`` bytes)."""
        source, cursor = self.sources[i], self.cursor[i]
        at = source.find(key, cursor)
        return (at, at - cursor <= self.anchor_reach) if at >= 0 else (source.rfind(key), False)

    def propose(self, tail: bytes, k: int, stop: re.Pattern[bytes] | None = None, *,
                ends: Callable[[bytes], bool] | None = None, value: bytes | None = None) -> Copy:
        """Up to ``k`` tokens continuing ``tail`` as the source does. The continuation's last token is
        dropped: it may be the first half of a word the model spells in one token.

        ``stop``: the continuation ends before its first match (where a copied value tends to end);
        with ``ends``, at the first such place or line end whose kind (:meth:`_places`) it says yes
        to. Matched right at such a place, nothing is proposed but the match and the place are
        reported. ``value``: the text of the value being written, when it has only begun (shorter
        than a match needs): it is looked for at the start of a word just after the last long match."""
        for n in range(min(self.max_bytes, len(tail)), self.min_bytes - 1, -1):
            key = tail[-n:]
            for i, source in enumerate(self.sources):
                at, anchored = self._find(i, key)
                if at < 0:
                    continue
                if n >= self.anchor_bytes:
                    self.cursor[i] = at + n
                start = at + n
                unique = source.find(key) == source.rfind(key)
                text, kind = self._continuation(i, start, k, stop, ends)
                if not text:
                    return Copy([], n if kind is not None else 0, unique, anchored, kind)
                return self._copy(text, k, kind, start + len(text) >= len(source), n, unique, anchored)
        if value:
            return self._value_start(value, k, stop, ends)
        return Copy([])

    def _copy(self, text: bytes, k: int, kind: bytes | None, whole: bool, matched: int, unique: bool,
              anchored: bool) -> Copy:
        """``text`` as at most ``k`` tokens; a copy longer than that does not reach its stop."""
        tokens = self.encode(text)
        ends = kind is not None or whole
        keep = min(k, len(tokens) if ends else len(tokens) - 1)
        return Copy(tokens[:keep], matched, unique, anchored, kind if keep == len(tokens) else None)

    def _value_start(self, value: bytes, k: int, stop: re.Pattern[bytes] | None,
                     ends: Callable[[bytes], bool] | None) -> Copy:
        """A value's first byte or two, at the start of a word soon after the last long match."""
        for i, source in enumerate(self.sources):
            cursor = self.cursor[i]
            for m in re.finditer(rb"(?<=[\s:>(\[])" + re.escape(value), source[cursor:cursor + self.anchor_reach]):
                start = cursor + m.end()
                text, kind = self._continuation(i, start, k, stop, ends)
                if not text:
                    return Copy([], len(value), False, True, kind)
                return self._copy(text, k, kind, False, len(value), False, True)
        return Copy([])

    def _continuation(self, i: int, start: int, k: int, stop: re.Pattern[bytes] | None,
                      ends: Callable[[bytes], bool] | None) -> tuple[bytes, bytes | None]:
        """The text after ``start`` that a draft may copy, and the kind of place that ends it."""
        source = self.sources[i]
        text = source[start:start + (k + 1) * self.bytes_per_token]
        for at, kind, line in self._places(i, start, text, stop):
            if ends(kind) if ends is not None else not line:
                return text[:at].rstrip(b" "), kind
        if start + len(text) >= len(source):
            return text.rstrip(b" "), b"\n"  # the source ends: so does any value copied from it
        return text, None

    def _places(self, i: int, start: int, text: bytes,
                stop: re.Pattern[bytes] | None) -> Iterator[tuple[int, bytes, bool]]:
        """Where in ``text`` (at ``start`` of source ``i``) a copied value may end, in order: offset,
        kind (the punctuation there, then the line's kind when a line ends there too) and whether it
        is a bare line end (which the spaced rendering cannot show)."""
        source, breaks = self.sources[i], self.line_ends[i]
        places: dict[int, tuple[bytes, bool]] = {}
        for m in stop.finditer(text) if stop is not None else ():
            if m.group() == b"\\n":
                places[m.start()] = (self._line_kind(i, start + m.start()), False)
                continue
            punct = m.group().strip()[:1]
            after = start + m.start() + m.group().index(punct) + 1
            line = source.startswith(b"\\n", after) or after >= len(source) or after in breaks
            places[m.start()] = (punct + (self._line_kind(i, after) if line else b""), False)
        for j in range(bisect.bisect_left(breaks, start), len(breaks)):
            at = breaks[j] - start
            if at > len(text):
                break
            if at not in places and at - 1 not in places:  # punctuation just before: it names the place
                places[at] = (self._line_kind(i, breaks[j]), True)
        for at in sorted(places):
            yield at, *places[at]

    def _line_kind(self, i: int, at: int) -> bytes:
        """A line ends at ``at`` (its break, ``\\n`` escaped or a space): ``\n:`` when the next line
        starts with a label (``Reporter: ...``), so the line was one field of a record, else ``\n``."""
        source = self.sources[i]
        nxt = at + (2 if source.startswith(b"\\n", at) else 1)
        return b"\n:" if LABEL.match(source, nxt) else b"\n"
