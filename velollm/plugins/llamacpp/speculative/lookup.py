"""Prompt lookup drafting: propose what followed the last earlier occurrence of the current tail.

Costs microseconds per step and no model, and when an answer copies its input (a code edit, a
quoted passage) it drafts long runs the target accepts. The index is updated incrementally, one
dict write per n-gram size per token, so lookups stay O(1) however long the context grows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence


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


class TextLookup:
    """Prompt lookup on text: find the longest end of the output's text in the prompt's text and
    propose the prompt's continuation, tokenized afresh.

    Token n-grams miss where an answer copies a span but tokenizes its first word differently (a
    JSON value opens with ``"Open`` where the prompt had `` Open``); the text still matches after one
    token, so a copied value is drafted from its second token on.
    """

    def __init__(self, encode: Callable[[bytes], list[int]], min_bytes: int = 3, max_bytes: int = 32,
                 bytes_per_token: int = 6) -> None:
        self.encode = encode
        self.min_bytes, self.max_bytes, self.bytes_per_token = min_bytes, max_bytes, bytes_per_token
        self.sources: tuple[bytes, ...] = ()

    @property
    def source(self) -> bytes:
        return self.sources[0] if self.sources else b""

    def reset(self, *sources: bytes) -> None:
        """The texts an answer copies from, the likelier rendering first (e.g. the prompt with its
        line breaks as spaces, then as written): a match of equal length is taken from the earlier."""
        self.sources = tuple(s for s in sources if s)

    def propose(self, tail: bytes, k: int, stop: re.Pattern[bytes] | None = None) -> tuple[list[int], int, bool]:
        """Up to ``k`` tokens, how many bytes of ``tail`` matched (0: none), and whether they occur
        once only in the source they matched in (an unambiguous continuation). The continuation's
        last token is dropped: it may be the first half of a word the model spells in one token.
        ``stop``: the continuation ends before its first match (where a copied value tends to end);
        matched right there, nothing is proposed but the match is reported."""
        for n in range(min(self.max_bytes, len(tail)), self.min_bytes - 1, -1):
            key = tail[-n:]
            for source in self.sources:
                at = source.rfind(key)
                if at < 0:
                    continue
                start = at + n
                text = source[start:start + (k + 1) * self.bytes_per_token]
                whole = start + len(text) >= len(source)
                unique = source.find(key) == at
                if stop is not None and (end := stop.search(text)) is not None:
                    text, whole = text[:end.start()].rstrip(b" "), True
                    if not text:  # matched right where the copy may end: nothing to propose
                        return [], n, unique
                if not text:
                    return [], 0, False
                tokens = self.encode(text)
                keep = min(k, len(tokens) if whole else len(tokens) - 1)
                return tokens[:keep], n, unique
        return [], 0, False
