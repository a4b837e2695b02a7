"""Pre-tokenization for byte-level BPE: split text into words the way llama.cpp does.

llama.cpp does not run these regexes on Unicode text. It "collapses" every non-ASCII code point
into one placeholder byte for its category (letter, number, whitespace, other), rewrites
``\\p{L}``/``\\p{N}`` in the pattern to match those placeholders, and runs ``std::regex``
(ECMAScript, ASCII ``\\s``). Doing the same here, with Python's ``re`` in ASCII mode on the
collapsed text, gives the same word boundaries, including for emoji, CJK and combining marks.
"""

from __future__ import annotations

import re
import unicodedata

# GPT-2's reversible byte -> printable character map (also llama.cpp's unicode_byte_to_utf8_map)
_printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
_extra = iter(range(256, 512))
BYTE_TO_UNICODE: list[str] = [chr(b) if b in _printable else chr(next(_extra)) for b in range(256)]
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}

# Unicode White_Space above ASCII (what llama.cpp's generated table holds for non-ASCII code points)
_WHITESPACE = {0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}

_NUMBER, _LETTER, _PUNCT, _MARK, _SYMBOL, _OTHER, _SPACE = "\xd1", "\xd2", "\xd3", "\xd4", "\xd5", "\xd0", "\x0b"
_CATEGORY = {"N": _NUMBER, "L": _LETTER, "P": _PUNCT, "M": _MARK, "S": _SYMBOL}


class _Collapse(dict):
    """A ``str.translate`` table filled on demand: code point -> its category placeholder."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            value = chr(cp)  # ASCII stays as is
        elif cp in _WHITESPACE:
            value = _SPACE
        else:
            value = _CATEGORY.get(unicodedata.category(chr(cp))[0], _OTHER)
        self[cp] = value
        return value


_COLLAPSE = _Collapse()

_L = "\xd2A-Za-z"
_N = "\xd10-9"
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# llama.cpp's patterns (llm_tokenizer_bpe) with \p{L} and \p{N} rewritten for the collapsed text
PATTERNS: dict[str, re.Pattern[str]] = {
    "qwen2": re.compile(
        rf"{_CONTRACTIONS}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]| ?[^\s{_L}{_N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", re.ASCII),
    "llama3": re.compile(
        rf"{_CONTRACTIONS}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]{{1,3}}| ?[^\s{_L}{_N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        re.ASCII),
    "gpt2": re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^\s{_L}{_N}]+|\s+(?!\S)", re.ASCII),
}


def split_words(text: str, family: str) -> list[str]:
    """The pre-tokenizer's words, in order; unmatched stretches become words of their own."""
    collapsed = text.translate(_COLLAPSE)
    words: list[str] = []
    pos = 0
    for match in PATTERNS[family].finditer(collapsed):
        start, end = match.span()
        if start > pos:
            words.append(text[pos:start])
        words.append(text[start:end])
        pos = end
    if pos < len(text):
        words.append(text[pos:])
    return words


def byte_encode(word: str) -> str:
    """UTF-8 bytes of ``word`` as GPT-2's printable characters (the alphabet of the BPE vocabulary)."""
    return "".join([BYTE_TO_UNICODE[b] for b in word.encode("utf-8")])


def byte_decode(text: str) -> bytes:
    """Inverse of :func:`byte_encode` for a token's text; unknown characters pass through as UTF-8."""
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)
