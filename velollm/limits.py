"""Limits on what a client may send, checked before anything recursive or native sees it.

llama.cpp's GBNF parser recurses once per nesting level on the calling thread (a grammar nested
30,000 deep killed the whole server with SIGSEGV), and Python's ``json`` recurses per level of a
request body (30,000 levels: RecursionError). So depth is measured here by scanning, never by
recursing, and the answer is a typed error naming the problem (400 on the server).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from velollm.errors import GrammarError, InvalidRequest

#: Largest request body the server reads (bytes); prompts of a full 128k context fit easily.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Deepest nesting of arrays/objects in a request body (JSON schemas in response_format included).
MAX_JSON_DEPTH = 128
#: Largest GBNF grammar (bytes of UTF-8); JSON-schema grammars of large schemas are a few KiB.
MAX_GRAMMAR_BYTES = 256 * 1024
#: Deepest parenthesis nesting in a GBNF grammar (llama.cpp recurses per level).
MAX_GRAMMAR_DEPTH = 256
#: Most rules in a GBNF grammar (llama.cpp's left-recursion check and stack expansion recurse over rule chains).
MAX_GRAMMAR_RULES = 4096
#: Largest bound in a ``{m,n}`` repetition (llama.cpp expands each into about n nested rules).
MAX_GRAMMAR_REPEAT = 4096

_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


# --- text -------------------------------------------------------------------------------------
def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (it cannot be encoded as UTF-8), else None."""
    match = _SURROGATE.search(text)
    return None if match is None else match.start()


def check_text(text: str, where: str) -> None:
    """Refuse text that cannot become UTF-8 (a lone surrogate such as ``"\\ud800"``)."""
    at = lone_surrogate(text)
    if at is not None:
        raise InvalidRequest(f"{where} contains a lone surrogate (U+{ord(text[at]):04X} at character {at}); "
                             "text must be valid Unicode")


def check_no_surrogates(value: Any, where: str = "") -> None:
    """Walk a parsed JSON value (iteratively) and refuse the first string or key with a lone surrogate;
    the error names its path (``messages[0].content``)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path or "the request body")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str):
                    check_text(key, f"a key in {path or 'the request body'}")
                stack.append((sub, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))


# --- JSON bodies --------------------------------------------------------------------------------
def json_depth(raw: bytes) -> int:
    """Deepest array/object nesting of a JSON document, without parsing (strings are skipped)."""
    skeleton = _JSON_STRING.sub(b"", raw)
    if not skeleton:
        return 0
    steps = _BRACKET_STEP[np.frombuffer(skeleton, dtype=np.uint8)].astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def check_json_body(raw: bytes, *, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a body that is too large or nested too deep before ``json.loads`` recurses into it."""
    if len(raw) > max_bytes:
        raise BodyTooLarge(f"the request body has {len(raw):,} bytes; the limit is {max_bytes:,}")
    depth = json_depth(raw)
    if depth > max_depth:
        raise InvalidRequest(f"the request body is nested {depth} levels deep; the limit is {max_depth}")


class BodyTooLarge(InvalidRequest):
    """The request body is larger than the server accepts (HTTP 413)."""


class UnsupportedMediaType(InvalidRequest):
    """The request body is not declared as JSON (HTTP 415)."""


class InvalidJSON(InvalidRequest):
    """The request body does not parse as JSON."""


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json``, ``application/*+json``, or no Content-Type at all (curl without -H)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_json_body(raw: bytes, content_type: str | None = None, *, max_bytes: int = MAX_BODY_BYTES,
                    max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body as JSON, after the media type, size, depth and Unicode checks (each a typed error)."""
    if not is_json_media_type(content_type):
        raise UnsupportedMediaType(f"send the request body as JSON ('Content-Type: application/json'), "
                                   f"not {content_type.split(';', 1)[0].strip()!r}")
    check_json_body(raw, max_bytes=max_bytes, max_depth=max_depth)
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # pragma: no cover - the depth check above comes first
        raise InvalidRequest("the request body is nested too deep") from None
    check_no_surrogates(value)
    return value


# --- grammars -------------------------------------------------------------------------------------
def grammar_shape(gbnf: str) -> tuple[int, int, int]:
    """``(deepest parenthesis nesting, rule definitions, largest {m,n} bound)`` of GBNF (or Lark) text, by one scan.

    Skips string literals, character classes, Lark's ``/regex/`` and comments, as the parsers do;
    the text must already be free of lone surrogates.
    """
    depth = deepest = rules = repeat = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"'[":
            close = "]" if c == "[" else c
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "/" and i + 1 < n and gbnf[i + 1] != "/":  # Lark regex /.../
            j = i + 1
            while j < n and gbnf[j] not in "/\n":
                j += 2 if gbnf[j] == "\\" else 1
            i = j if j < n and gbnf[j] == "/" else i
        elif c == "#" or gbnf.startswith("//", i):  # comment to end of line
            while i < n and gbnf[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == ":" and gbnf.startswith("::=", i):
            rules += 1
            i += 2
        elif c == "{":
            match = _REPEAT.match(gbnf, i)
            if match:
                repeat = max([repeat, *(int(x) if len(x) < 10 else 10**10 for x in match.groups() if x)])
                i = match.end() - 1
        i += 1
    return deepest, rules, repeat


def check_grammar(gbnf: Any, *, max_bytes: int = MAX_GRAMMAR_BYTES, max_depth: int = MAX_GRAMMAR_DEPTH,
                  max_rules: int = MAX_GRAMMAR_RULES, max_repeat: int = MAX_GRAMMAR_REPEAT) -> None:
    """Refuse a grammar the parsers must not see: not text, empty, too large, too deep, bad Unicode.

    GBNF (``root ::= ...``) and Lark (``start: ...``, llguidance) both pass; whether the rules make
    sense is the parser's to say.
    """
    if not isinstance(gbnf, str):
        raise GrammarError(f"a grammar must be GBNF text, got {type(gbnf).__name__}")
    if not gbnf.strip():
        raise GrammarError("the grammar is empty: give GBNF rules with a 'root ::= ...' rule")
    at = lone_surrogate(gbnf)
    if at is not None:
        raise GrammarError(f"the grammar contains a lone surrogate (character {at}); it must be valid Unicode")
    size = len(gbnf.encode("utf-8"))
    if size > max_bytes:
        raise GrammarError(f"the grammar has {size:,} bytes; the limit is {max_bytes:,}")
    depth, rules, repeat = grammar_shape(gbnf)
    if depth > max_depth:
        raise GrammarError(f"the grammar nests parentheses {depth} deep; the limit is {max_depth}")
    if rules > max_rules:
        raise GrammarError(f"the grammar has {rules:,} rules; the limit is {max_rules:,}")
    if repeat > max_repeat:
        raise GrammarError(f"the grammar repeats up to {repeat:,} times ({{m,n}}); the limit is {max_repeat:,}")
