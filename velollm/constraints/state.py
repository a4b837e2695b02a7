"""One constrained sequence: which tokens may come next, and when to steer an answer closed.

``ConstraintFactory`` holds a compiled llguidance matcher (one per grammar/schema, cached per
engine); ``start()`` copies it for one sequence. The state answers the decode loop's questions:

* ``allows(token)`` — one token, microseconds: the fast path checks the argmax (or the sampled
  token) first and computes the whole-vocabulary ``mask`` only when it is refused;
* ``advance(token)`` after a token is chosen; ``forced()`` — the tokens the grammar forces next
  (JSON keys and punctuation), which speculative decoding uses as free drafts;
* ``done`` — the grammar cannot go on.

For JSON it also **steers**: when the tokens left reach what closing the answer needs
(:mod:`velollm.constraints.budget`), or a string value falls into a loop
(:mod:`velollm.constraints.loops`), the allowed set narrows to closing tokens (``"``, ``]``,
``}``, then ``,``) for as long as it takes. Steering only narrows what the grammar allows, so
the answer stays valid; with a budget that fits, nothing changes and greedy output is the
grammar's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from velollm.constraints import budget, grammars
from velollm.constraints.loops import LoopDetector
from velollm.constraints.vocab import ConstraintVocab
from velollm.errors import GrammarError

#: tokens kept in hand beyond the computed minimum (whitespace the model may still write)
SLACK = 3
#: digits in a row a JSON number may have (llama-cpp-python's converter: ``[0-9]{1,16}`` per part)
MAX_DIGITS = 16


class JsonCursor:
    """Where a JSON text stands, byte by byte: nesting, strings, the top-level field being written."""

    def __init__(self) -> None:
        self.stack: list[int] = []  # ord('{') / ord('[')
        self.in_string = False
        self.escape = False
        self.is_key = False
        self.expect_key = False
        self.field: str | None = None  # the top-level key whose value is being written
        self._key = bytearray()
        self.digits = 0  # digits in a row outside strings (the number being written)
        self.string_opened = False  # a value string opened during the last feed
        self.string_closed = False  # a value string closed during the last feed

    def feed(self, data: bytes) -> None:
        self.string_opened = self.string_closed = False
        for c in data:
            self.digits = self.digits + 1 if not self.in_string and 0x30 <= c <= 0x39 else 0
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == 0x5C:  # backslash
                    self.escape = True
                elif c == 0x22:  # quote
                    self.in_string = False
                    if self.is_key:
                        if len(self.stack) == 1:
                            self.field = self._key.decode("utf-8", "replace")
                    else:
                        self.string_closed = True
                elif self.is_key and len(self.stack) == 1:
                    self._key.append(c)
            elif c == 0x22:
                self.in_string = True
                self.is_key = bool(self.stack) and self.stack[-1] == 0x7B and self.expect_key
                self.expect_key = False
                if self.is_key:
                    self._key.clear()
                else:
                    self.string_opened = True
            elif c in (0x7B, 0x5B):
                self.stack.append(c)
                self.expect_key = c == 0x7B
            elif c in (0x7D, 0x5D):
                if self.stack:
                    self.stack.pop()
                self.expect_key = False
            elif c == 0x2C:  # comma
                self.expect_key = bool(self.stack) and self.stack[-1] == 0x7B

    @property
    def in_value_string(self) -> bool:
        return self.in_string and not self.is_key


class ConstraintFactory:
    """A compiled constraint; ``start()`` gives each sequence its own state."""

    def __init__(self, vocab: ConstraintVocab, grammar: str, json_schema: dict[str, Any] | None) -> None:
        import llguidance

        self.vocab = vocab
        self.grammar = grammar
        self.json_schema = json_schema
        error = llguidance.LLMatcher.validate_grammar(grammar, vocab.tokenizer)
        if error:
            raise GrammarError(f"invalid grammar: {error.splitlines()[0]}")
        self._matcher = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"invalid grammar: {self._matcher.get_error().splitlines()[0]}")
        self.costs = budget.field_costs(json_schema, vocab.count) if json_schema is not None else None

    @property
    def minimum_tokens(self) -> int:
        """The fewest tokens a complete answer takes (JSON schemas; 1 for grammars)."""
        return self.costs.whole if self.costs is not None else 1

    def start(self, max_tokens: int | None = None, *, loops: bool = True) -> ConstraintState:
        """A fresh state for one sequence; ``max_tokens`` turns on closing within that budget (JSON)."""
        return ConstraintState(self, self._matcher.deep_copy(), max_tokens, loops=loops)


class ConstraintState:
    """The per-sequence constraint (see the module docstring)."""

    def __init__(self, factory: ConstraintFactory, matcher: Any, max_tokens: int | None, *, loops: bool) -> None:
        self.factory = factory
        self.vocab = factory.vocab
        self._m = matcher
        self.max_tokens = max_tokens
        self.json = factory.json_schema is not None
        self.cursor = JsonCursor() if self.json else None
        self.loops = LoopDetector(self.vocab.classes) if loops else None
        # repeated items outside strings (``"cook", "cook", ...``): exact repeats only, so a list 1..50 passes
        self.outer_loops = LoopDetector(self.vocab.classes, counting=False) if loops and self.json else None
        self.close_depth = 0  # > 0: steering out of a looping array/object opened at this depth
        self.n = 0  # tokens advanced
        self.closing = False  # steering to the end of the answer (budget or a loop outside strings)
        self.close_string = False  # steering out of one looping string value
        self.loops_closed = 0  # strings closed because they looped
        self.refusals = 0  # tokens the grammar refused first (a whole-vocabulary mask was computed)
        self._allowed: np.ndarray | None = None  # this step's allowed set when steering
        self._update_closing()

    # --- questions ------------------------------------------------------------------------------
    @property
    def steering(self) -> bool:
        return self.closing or self.close_string or self.close_depth > 0 or self._long_number

    @property
    def _long_number(self) -> bool:
        # only near the cap, so ordinary numbers keep the one-token fast path
        return self.cursor is not None and self.cursor.digits > MAX_DIGITS - 4

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._m.is_accepting())

    def allows(self, token: int) -> bool:
        if not 0 <= token < self.vocab.n_vocab:
            return False
        if self.steering:
            return bool(self._steered()[token])
        return self._m.validate_tokens([token]) == 1

    def allowed(self, logits: np.ndarray | None = None) -> np.ndarray:
        """Booleans over the vocabulary: what may come next (steering included); with ``logits``,
        the likeliest tokens are checked one by one too (see :meth:`_grammar_allowed`)."""
        return self._steered() if self.steering else self._grammar_allowed(logits)

    def mask(self, logits: np.ndarray) -> None:
        """Set refused tokens' logits to -inf, in place (``logits`` may be longer than the vocabulary)."""
        self.refusals += 1
        ok = self.allowed(logits)
        n = len(ok)
        logits[:n][~ok] = -np.inf
        logits[n:] = -np.inf

    def pick_greedy(self, logits: np.ndarray) -> int:
        """The argmax among allowed tokens: check the argmax first, mask a copy only when refused."""
        token = int(np.argmax(logits))
        if self.allows(token):
            return token
        row = np.array(logits, dtype=np.float32, copy=True)
        self.mask(row)
        token = int(np.argmax(row))
        if not np.isfinite(row[token]):
            raise GrammarError("the grammar allows no token here")
        return token

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (none while steering: steering decides there)."""
        if self.steering:
            return []
        return list(self._m.compute_ff_tokens())

    def walk(self, propose: Callable[[list[int]], list[int]], limit: int,
             merges: dict[bytes, int] | None = None) -> tuple[list[int], list[bool]]:
        """A speculative draft that obeys the grammar: the tokens it forces (JSON keys, punctuation)
        and, where it forces none, ``propose(drafted so far)``'s tokens cut at the first one it refuses.

        Forced text is drafted as ``merges`` (forced text -> token) says the model began it before
        (a key spelled ``except`` + ``ion``, not in the canonical tokens; ``":"`` for ``"`` before
        ``:``), else in its canonical tokens, without a last token that may merge with free text.
        Walked ahead on the matcher and rolled back, so the state is unchanged. Returns the tokens
        and, per token, whether the grammar forced it. Nothing while steering: steering decides there.
        """
        tokens: list[int] = []
        forced: list[bool] = []
        if self.steering or self.done or limit <= 0:
            return tokens, forced
        m = self._m
        try:
            while len(tokens) < limit and not m.is_stopped():
                text = bytes(m.compute_ff_bytes())
                if text and merges and (known := merges.get(text)) is not None:  # as the model spelled it before
                    ahead = [known]
                else:
                    ahead = list(m.compute_ff_tokens())
                    if not ahead and text:  # its last token may merge with what follows
                        ahead = self.vocab.encode(text)[:-1]
                ahead = ahead[: limit - len(tokens)]
                by_grammar = bool(ahead)
                if not ahead:
                    ahead = propose(tokens)[: limit - len(tokens)]
                ahead = ahead[: m.validate_tokens(ahead)] if ahead else []
                if not ahead or not m.consume_tokens(ahead):
                    break
                tokens += ahead
                forced += [by_grammar] * len(ahead)
        finally:
            if tokens:
                m.rollback(len(tokens))
        return tokens, forced

    def forced_text(self) -> bytes:
        """The text the grammar forces next (nothing while steering)."""
        return b"" if self.steering else bytes(self._m.compute_ff_bytes())

    def merged_spelling(self, token: int) -> bytes | None:
        """The forced text ``token`` (about to be taken) spells together with free text after it,
        e.g. ``"`` in ``":"``; None when nothing is forced or the token is the forced text's own."""
        if self.steering or self._m.compute_ff_tokens():
            return None
        text = self._m.compute_ff_bytes()
        piece = self.vocab.pieces[token] if 0 <= token < self.vocab.n_vocab else b""
        return text if text and len(piece) > len(text) and piece.startswith(text) else None

    # --- moving on ------------------------------------------------------------------------------
    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GrammarError(f"token {token} is not allowed here: {self._m.get_error()}")
        self.n += 1
        self._allowed = None
        if self.cursor is not None and token < self.vocab.n_vocab:
            was_in_value = self.cursor.in_value_string
            self.cursor.feed(self.vocab.pieces[token])
            if self.cursor.string_opened and not was_in_value and self.loops is not None:
                self.loops.reset()
            if self.close_string and not self.cursor.in_value_string:
                self.close_string = False
            if self.loops is not None and self.cursor.in_value_string and self.loops.feed(token):
                self.close_string = True
                self.loops_closed += 1
                self.loops.reset()
                if self.outer_loops is not None:
                    self.outer_loops.reset()
            if self.close_depth and len(self.cursor.stack) < self.close_depth:
                self.close_depth = 0
            if (self.outer_loops is not None and self.outer_loops.feed(token) and self.cursor.stack
                    and not self.cursor.in_value_string):
                self.close_depth = len(self.cursor.stack)
                self.loops_closed += 1
                self.outer_loops.reset()
        elif self.loops is not None:
            self.loops.feed(token)
        self._update_closing()

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` tokens in the grammar (speculation); steering state is not rewound."""
        if n:
            self._m.rollback(n)
            self.n -= n
            self._allowed = None

    @property
    def looping(self) -> bool:
        """A loop was seen where it cannot be steered (grammars other than JSON)."""
        return self.loops is not None and self.loops.looping

    # --- steering -------------------------------------------------------------------------------
    def _update_closing(self) -> None:
        costs = self.factory.costs
        if self.closing or costs is None or self.max_tokens is None or self.cursor is None:
            return
        left = self.max_tokens - self.n
        need = costs.reserve(self.cursor.field, len(self.cursor.stack)) + len(self.cursor.stack) + SLACK
        if left <= need:
            self.closing = True

    def _grammar_allowed(self, logits: np.ndarray | None = None) -> np.ndarray:
        """llguidance's mask, widened to every tokenization of forced text.

        Where the grammar forces text (a JSON key), llguidance's mask holds only the canonical
        first token (``tags``), while any token spelling a prefix of it (``t``) is valid too and
        llama.cpp's GBNF sampler allows it; the greedy choice must not depend on the engine.
        """
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        ok = np.unpackbits(bits, bitorder="little")[: self.vocab.n_vocab].astype(bool)
        forced = self._m.compute_ff_bytes()
        if forced:
            candidates = [t for k in range(1, len(forced) + 1) for t in self.vocab.ids_of.get(forced[:k], ())]
            if logits is not None:  # tokens running past the forced text: the likeliest ones are checked
                candidates.extend(int(t) for t in np.argpartition(-logits[: self.vocab.n_vocab], 64)[:64])
            for token in candidates:
                if not ok[token] and self._m.validate_tokens([token]) == 1:
                    ok[token] = True
        return ok

    def _steered(self) -> np.ndarray:
        if self._allowed is None:
            ok = self._grammar_allowed()
            if self._long_number:
                assert self.cursor is not None
                ok &= self.vocab.leading_digits <= MAX_DIGITS - self.cursor.digits
            if self.close_string:
                choice = ok & self.vocab.quote_first
                ok = choice if choice.any() else ok
            elif self.close_depth and not self.closing:  # out of a looping array: end the string, then it
                inside = self.cursor is not None and self.cursor.in_value_string
                choice = ok & (self.vocab.quote_first if inside else self.vocab.brackets)
                ok = choice if choice.any() else ok
            if self.closing:
                ok = self._closing_choice(ok)
            self._allowed = ok
        return self._allowed


    def _closing_choice(self, ok: np.ndarray) -> np.ndarray:
        """The fewest tokens to the end: forced text in its canonical tokens, closers before separators,
        no spare whitespace."""
        forced = self._m.compute_ff_tokens()
        if forced and ok[forced[0]]:
            only = np.zeros_like(ok)
            only[forced[0]] = True
            return only
        vocab = self.vocab
        if self.cursor is not None and self.cursor.in_value_string:  # ']' and '}' are text in here
            choices = [vocab.quote_first & vocab.compact, vocab.quote_first]
        else:
            choices = [vocab.brackets & vocab.compact, (vocab.closers == 2) & vocab.compact, vocab.closers == 2,
                       (vocab.closers == 1) & vocab.compact, vocab.closers == 1]
        for choice in [*choices, vocab.compact, ~vocab.blank]:
            narrowed = ok & choice
            if narrowed.any():
                return narrowed
        return ok


def compile_constraint(*, json_schema: dict[str, Any] | None = None, grammar: str | None = None,
                       tokenizer: ConstraintVocab) -> ConstraintFactory:
    """A JSON schema, or a GBNF/Lark grammar, compiled for one vocabulary (GrammarError when unusable)."""
    if (json_schema is None) == (grammar is None):
        raise GrammarError("give exactly one of json_schema or grammar")
    compiled = grammars.from_json_schema(json_schema) if json_schema is not None else grammars.from_grammar(grammar)
    return ConstraintFactory(tokenizer, compiled, json_schema)


class ConstraintCache:
    """Compiled constraints per engine, most recently used kept (compiling a schema takes milliseconds)."""

    def __init__(self, vocab: ConstraintVocab, size: int = 32) -> None:
        self.vocab = vocab
        self.size = size
        self._items: dict[str, ConstraintFactory] = {}

    def get(self, *, json_schema: dict[str, Any] | None = None, grammar: str | None = None) -> ConstraintFactory:
        key = grammars.describe(json_schema, grammar)
        factory = self._items.pop(key, None)
        if factory is None:
            factory = compile_constraint(json_schema=json_schema, grammar=grammar, tokenizer=self.vocab)
        self._items[key] = factory
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return factory
