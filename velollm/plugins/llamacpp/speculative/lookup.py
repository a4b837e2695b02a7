"""Prompt lookup drafting: propose what followed the last earlier occurrence of the current tail.

Costs microseconds per step and no model, and when an answer copies its input (a code edit, a
quoted passage) it drafts long runs the target accepts. The index is updated incrementally, one
dict write per n-gram size per token, so lookups stay O(1) however long the context grows.
"""

from __future__ import annotations

from collections.abc import Iterable


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

    def propose(self, k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens to draft, and the n-gram size that matched (0: nothing matched).

        The longest n-gram wins: a 3-token match predicts the continuation better than a 1-token one.
        """
        seq = self.tokens
        size = len(seq)
        if k <= 0:
            return [], 0
        for n in range(min(self.max_ngram, size), self.min_ngram - 1, -1):
            start = self._next[n].get(tuple(seq[size - n:]))
            if start is not None:
                return seq[start:start + k], n
        return [], 0
