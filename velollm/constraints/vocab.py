"""A model's vocabulary as the constraint engine sees it: the bytes of every token, end tokens, a tokenizer.

Backend-neutral: the llama.cpp backend builds one from its ``llama_vocab`` (:func:`from_llama_vocab`),
the native engine from its own tokenizer (:func:`from_pieces`). Building llguidance's token trie
takes about a second for a 150k vocabulary, so engines keep one per model.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from velollm.constraints.loops import TokenClasses

#: bytes a token may hold when it only closes things (strings, arrays, objects) or separates them
_CLOSERS = frozenset(b'"]},')
_SPACE = frozenset(b" \n\t\r")


class _Wrapper:
    """The duck-typed tokenizer ``llguidance.LLTokenizer`` accepts."""

    def __init__(self, pieces: list[bytes], eos: int, bos: int | None, special: list[int],
                 encode: Callable[[bytes], list[int]]) -> None:
        self.tokens = pieces
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.special_token_ids = special
        self.is_tokenizer_wrapper = True
        self._encode = encode

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.encode("utf-8") if isinstance(text, str) else text)


class ConstraintVocab:
    """Token bytes, end-of-generation ids and the llguidance tokenizer built from them."""

    def __init__(self, pieces: Sequence[bytes], eos: Sequence[int], encode: Callable[[bytes], list[int]], *,
                 special: Sequence[int] = (), bos: int | None = None, lltokenizer: Any = None) -> None:
        import llguidance

        if not eos:
            raise ValueError("a constraint vocabulary needs at least one end-of-generation token")
        self.pieces = list(pieces)
        self.n_vocab = len(self.pieces)
        self.eos = list(eos)
        self.special = frozenset(special)
        self.encode = encode
        self.tokenizer = lltokenizer or llguidance.LLTokenizer(
            _Wrapper(self._marked_pieces(), self.eos[0], bos, list(self.special), encode), eos_token=self.eos)
        self.classes = TokenClasses(self.pieces)

    def _marked_pieces(self) -> list[bytes]:
        # llguidance marks special tokens with a 0xff prefix so no grammar text can produce them
        return [b"\xff" + p if i in self.special else p for i, p in enumerate(self.pieces)]

    @cached_property
    def closers(self) -> np.ndarray:
        """Per token: 2 = only closes (``"``, ``]``, ``}``), 1 = closes and separates (``,``), 0 = other."""
        rank = np.zeros(self.n_vocab, dtype=np.int8)
        for i, piece in enumerate(self.pieces):
            body = set(piece) - _SPACE
            if i in self.special or not body or not body <= _CLOSERS:
                continue
            rank[i] = 1 if ord(",") in body else 2
        return rank

    @cached_property
    def leading_digits(self) -> np.ndarray:
        """Per token: how many ASCII digits it starts with."""
        return np.array([len(p) - len(p.lstrip(b"0123456789")) for p in self.pieces], dtype=np.int32)

    @cached_property
    def ids_of(self) -> dict[bytes, list[int]]:
        """Token ids per piece (normal tokens only)."""
        ids: dict[bytes, list[int]] = {}
        for i, piece in enumerate(self.pieces):
            if piece and i not in self.special:
                ids.setdefault(piece, []).append(i)
        return ids

    @cached_property
    def compact(self) -> np.ndarray:
        """Tokens without whitespace."""
        return np.array([not (set(p) & _SPACE) for p in self.pieces], dtype=bool)

    @cached_property
    def blank(self) -> np.ndarray:
        """Whitespace-only tokens."""
        return np.array([bool(p) and set(p) <= _SPACE for p in self.pieces], dtype=bool)

    @cached_property
    def brackets(self) -> np.ndarray:
        """Closing tokens that start by ending an array or object (``]``, ``}``, ``]}``...)."""
        return np.array([self.closers[i] > 0 and p.lstrip(b" \n\t\r")[:1] in (b"]", b"}")
                         for i, p in enumerate(self.pieces)], dtype=bool)

    @cached_property
    def quote_first(self) -> np.ndarray:
        """Tokens that start by closing a string (a ``"``, then only closers/space)."""
        return np.array([self.closers[i] > 0 and p.lstrip(b" \n\t\r").startswith(b'"')
                         for i, p in enumerate(self.pieces)], dtype=bool)

    def count(self, text: str) -> int:
        """Tokens ``text`` takes (costs for budgets)."""
        return len(self.encode(text.encode("utf-8")))


def from_llama_vocab(vocab: Any) -> ConstraintVocab:
    """The vocabulary of a loaded llama.cpp model (``llama_cpp`` low-level ``llama_vocab`` pointer)."""
    import llama_cpp

    n = int(llama_cpp.llama_vocab_n_tokens(vocab))
    buf_len = 1024
    buf = ctypes.create_string_buffer(buf_len)
    pieces, special = [], []
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    for token in range(n):
        size = llama_cpp.llama_token_to_piece(vocab, token, buf, buf_len, 0, True)
        piece = bytes(buf[:size]) if size >= 0 else b""
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        # user-defined tokens (Qwen's <tool_call>) are text: llama.cpp's tokenizer turns their text into them
        # (so llguidance's forced tokens hold them), and llama.cpp's own grammars match them as text
        if attr & control:
            special.append(token)
        pieces.append(piece)
    eos = [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)] or [int(llama_cpp.llama_vocab_eos(vocab))]

    def encode(text: bytes) -> list[int]:
        size = len(text) + 16
        out = (llama_cpp.llama_token * size)()
        got = llama_cpp.llama_tokenize(vocab, text, len(text), out, size, False, False)
        if got < 0:
            out = (llama_cpp.llama_token * -got)()
            got = llama_cpp.llama_tokenize(vocab, text, len(text), out, -got, False, False)
        return list(out[:got])

    return ConstraintVocab(pieces, eos, encode, special=special)


def from_pieces(pieces: Sequence[bytes], eos: Sequence[int], encode: Callable[[bytes], list[int]],
                special: Sequence[int] = ()) -> ConstraintVocab:
    """A vocabulary from any tokenizer: token bytes, end ids, and ``encode(bytes) -> ids``."""
    return ConstraintVocab(pieces, eos, encode, special=special)
