"""Drafting along a constraint: what an extraction answer under a JSON schema will write next.

Such an answer alternates text the grammar forces (keys, punctuation) with values copied from the
prompt. The walk (:meth:`velollm.constraints.ConstraintState.walk`) drafts the forced text as the
model spelled it before, and copies where nothing is forced. This module keeps what a sequence
teaches about the model's habits: how it spells forced text that merges with free text, the spacing
after a comma or colon, and how it closes a value and moves on to the next key (``","`` or ``",`` +
`` "``), so a copy that reaches the place its value likely ends drafts the close and the next key in
the same step. :class:`ValueEnds` learns where values end (before a clause's punctuation, after it,
at a line's end) from every such place the output passes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

#: where a JSON value copied from a text tends to end: a clause's punctuation before a space or a
#: line break, a bracket. A copy is drafted up to there; if the value goes on, the target's next token
#: (free in the verifying batch) says so and the copy resumes in the next step
CLAUSE_END = re.compile(rb"[,.;:!?)\]>](?=\s|\\n)|\\n| \(|<")
#: what the model writes after JSON's comma or colon that is its spacing habit (not a value's start)
SPACING = re.compile(rb'\s*"?')
#: forced texts whose spelling a speculator remembers (JSON keys of the schemas in use)
MAX_SPELLINGS = 4096
#: tokens after a value's closing quote recorded as its close (``",`` then `` "``, before the next key)
MAX_CLOSE_TOKENS = 3
#: a close is drafted where a copy may end when the value ended at such places at least this often
CLOSE_MIN = 0.4
#: a copy stops at a place a value may end when values ended at such places at least this often
#: (below, it runs on through it: the commas inside a list of damages, a line that wraps prose)
STOP_MIN = 0.35
#: how often the model writes the spacing it wrote after the last close
HABIT_ACCEPTANCE = 0.97

Outcome = Literal["close", "after", "on"]
OUTCOMES: tuple[Outcome, ...] = ("close", "after", "on")


def opens_string(text: bytes) -> bool:
    """``text`` (JSON being written) ends with a string's opening quote (or a closing one: either way
    no copied text comes next)."""
    if not text.endswith(b'"'):
        return False
    backslashes = len(text) - 1 - len(text[:-1].rstrip(b"\\"))
    return backslashes % 2 == 0


def closing_quote(piece: bytes, escape: bool) -> int:
    """Where in ``piece`` (written inside a string; ``escape``: after a backslash) the string closes; -1."""
    for i, c in enumerate(piece):
        if escape:
            escape = False
        elif c == 0x5C:
            escape = True
        elif c == 0x22:
            return i
    return -1


def after_separator(text: bytes) -> bytes:
    """The comma or colon ``text`` ends with, when it follows a closing quote (JSON's, not a value's)."""
    return text[-1:] if text[-2:] in (b'",', b'":') and opens_string(text[:-1]) else b""


def value_begun(tail: bytes, most: int = 2) -> bytes | None:
    """The text of the JSON string value ``tail`` ends in, when it has only just begun (1..``most``
    bytes after the quote that opened it, right after a colon)."""
    at = tail.rfind(b'"', 0, len(tail) - 1)
    begun = tail[at + 1:]
    if at < 0 or not 0 < len(begun) <= most or b'"' in begun or b"\\" in begun:
        return None
    return begun if tail[:at].rstrip(b" ").endswith(b":") else None


@dataclass
class ValueEnds:
    """What the model did at places a copied value could have ended, per kind of place (the
    punctuation there; then ``\\n`` when a line ends there too, ``\\n:`` when the next line starts with a
    label): closed the value before the punctuation
    (``close``), after it (``after``), or went on. Decayed counts over a prior."""

    decay: float = 0.9
    prior_weight: float = 2.0
    counts: dict[bytes, list[float]] = field(default_factory=dict)

    @staticmethod
    def prior(kind: bytes) -> list[float]:
        """Before evidence: a line of a record (the next one starts with a label) holds one value; a
        sentence that ends a line ends its value more often than not; mid-line, values go on."""
        punct, _, line = kind.partition(b"\n")
        labelled = line == b":"
        if punct in (b"(", b"<"):  # an aside or a tag follows: as likely the value's end as not
            return [0.5, 0.0, 0.5]
        if not punct:
            return [0.75, 0.0, 0.25] if labelled else [0.3, 0.0, 0.7] if b"\n" in kind else [0.6, 0.0, 0.4]
        if b"\n" in kind:
            return [0.3, 0.6, 0.1] if labelled else [0.3, 0.5, 0.2]
        return [0.3, 0.1, 0.6]

    def odds(self, kind: bytes) -> dict[Outcome, float]:
        prior, counts = self.prior(kind), self.counts.get(kind, [0.0, 0.0, 0.0])
        total = sum(counts) + self.prior_weight
        return {o: (c + p * self.prior_weight) / total for o, c, p in zip(OUTCOMES, counts, prior, strict=True)}

    def observe(self, kind: bytes, outcome: Outcome) -> None:
        counts = self.counts.setdefault(kind, [0.0, 0.0, 0.0])
        for i, o in enumerate(OUTCOMES):
            counts[i] = counts[i] * self.decay + (1.0 if o == outcome else 0.0)

    @staticmethod
    def classify(kind: bytes, text: bytes) -> Outcome:
        """What the ``text`` written at such a place did."""
        punct = kind.partition(b"\n")[0]
        if text.startswith(b'"'):
            return "close"
        if punct and text.startswith(punct) and text[len(punct):len(punct) + 1] == b'"':
            return "after"
        return "on"


class ConstraintDrafts:
    """Drafting along a constraint (velollm.constraints), for one sequence: how the model spelled forced
    text that merges with free text, and how it closes a value (noted as tokens are picked), the walk
    (:meth:`velollm.constraints.ConstraintState.walk`) and the text an answer copies from."""

    def __init__(self, state: Any, spellings: dict[bytes, int] | None = None,
                 closes: dict[bytes, list[int]] | None = None) -> None:
        self.state = state
        # forced text -> the token the model began it with (walk); a Session shares its engine's
        self.merges: dict[bytes, int] = {} if spellings is None else spellings
        # text before a value's closing quote in the closing token -> the tokens up to the next key
        self.closes: dict[bytes, list[int]] = {} if closes is None else closes
        self._last = b""  # the text of the token taken last
        self._closing: tuple[bytes, list[int]] | None = None  # a close being recorded

    def note(self, token: int) -> None:
        """``token`` is about to be taken by the constraint (call before advancing it): where the grammar
        forces text, how the model spelled its start is remembered, so the walk drafts it that way
        next time (the model may write a key ``except`` + ``ion"`` where the canonical tokens differ);
        a value's close is recorded up to the next forced text."""
        state = self.state
        vocab = state.vocab
        piece = vocab.pieces[token] if 0 <= token < vocab.n_vocab else b""
        text = state.forced_text()
        if self._closing is not None:
            prefix, tokens = self._closing
            if text or len(tokens) >= MAX_CLOSE_TOKENS:
                if text:
                    self.closes[prefix] = tokens
                self._closing = None
            else:
                tokens.append(token)
        cursor = state.cursor if state.json else None
        if cursor is not None and cursor.in_value_string and (q := closing_quote(piece, cursor.escape)) >= 0:
            self._closing = (piece[:q], [token])
        if not text and (after := self.at_separator()) and SPACING.fullmatch(piece):
            self.merges[after] = token  # JSON leaves the spacing free: the model's habit (not a value's start)
        self._last = piece
        if not text:
            return
        if piece and (text.startswith(piece) or piece.startswith(text)):
            if len(self.merges) >= MAX_SPELLINGS and text not in self.merges:
                self.merges.clear()
            self.merges[text] = token

    def at_separator(self) -> bytes:
        """When the last token taken ended with a comma or a colon of JSON's (not inside a string), its
        key in :attr:`merges` (else nothing)."""
        cursor = self.state.cursor if self.state.json else None
        if cursor is None or cursor.in_string or not self._last or self._last[-1:] not in (b",", b":"):
            return b""
        return b"\0" + self._last[-1:]

    def separator(self, drafted: bytes = b"") -> list[int]:
        """What the model wrote after such a comma or colon before (the walk drafts it: the spacing
        before a key, which the grammar then forces, or before a value's opening quote).
        ``drafted``: the text drafted so far this step, when the walk is past the last picked token."""
        sep = after_separator(drafted) if drafted else b""
        key = (b"\0" + sep if sep else b"") if drafted else self.at_separator()
        token = self.merges.get(key) if key else None
        return [token] if token is not None else []

    def close(self, before: bytes) -> list[int]:
        """The tokens that close a value whose last text is ``before`` (b"": none, or the punctuation the
        value ends with) and lead to the next key, as the model wrote them last time; [] if unknown."""
        if before in self.closes:
            return list(self.closes[before])
        if before and b"" in self.closes:
            return [*self.state.vocab.encode(before), *self.closes[b""]]
        return []

    def walk(self, propose: Any, limit: int) -> tuple[list[int], list[bool]]:
        return self.state.walk(propose, limit, self.merges)

    def copy_source(self, prompt: bytes) -> bytes:
        """The text an answer copies from: the prompt; under JSON, the prompt as string escapes write
        it (a quote copied into a value is ``\\"``, a line break ``\\n``)."""
        if not self.state.json:
            return prompt
        return _escape(prompt)

    def copy_sources(self, prompt: bytes) -> tuple[tuple[bytes, ...], tuple[tuple[int, ...], ...]]:
        """:meth:`copy_source`, and first, under JSON, the same with the prompt's line breaks as spaces
        (a value copied from wrapped text joins its lines with a space far more often than with
        ``\\n``; the text lookup takes a match from the first rendering that has it, so a copy that
        does keep a line break matches on in the second), with where its lines ended."""
        exact = self.copy_source(prompt)
        if not self.state.json or b"\n" not in prompt:
            return (exact,), ((),)
        lines = [_escape(line) for line in prompt.replace(b"\r\n", b"\n").split(b"\n")]
        ends, at = [], 0
        for line in lines[:-1]:
            at += len(line)
            ends.append(at)
            at += 1
        return (b" ".join(lines), exact), (tuple(ends), ())


def _escape(text: bytes) -> bytes:
    return json.dumps(text.decode("utf-8", "replace"), ensure_ascii=False)[1:-1].encode()
