"""User grammars (JSON schema, GBNF, Lark) -> one llguidance grammar, checked before anything runs.

Nothing here recurses on user input without a bound: the nesting of a schema and of a GBNF/Lark
grammar is measured with a loop first, and deeper input is refused with :class:`GrammarError`
(llama.cpp's own GBNF parser recursed per level and crashed the process on a 30,000-deep one).

JSON whitespace follows llama-cpp-python's schema converter (``space ::= " "?``: at most one space
between tokens), so a greedy answer is the one the GBNF path wrote. One deliberate difference:
strings may not hold raw control characters (a raw newline), which that grammar allowed and which
makes the JSON invalid.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from velollm.errors import GrammarError

#: deeper schemas/grammars are refused (no real schema comes near; crafted ones would blow a stack)
MAX_NESTING = 64
#: llama-cpp-python 0.3's converter: ``space ::= " "?``
WHITESPACE = r" "


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def grammar_depth(text: str) -> int:
    """Deepest ``( ... )`` nesting of a GBNF/Lark grammar (:func:`velollm.limits.grammar_shape`'s scan)."""
    from velollm.limits import grammar_shape

    return grammar_shape(text)[0]


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where objects with ``properties`` and no ``additionalProperties`` allow no other keys,
    as llama-cpp-python's converter reads them (and as a small model needs: open objects wander)."""
    schema = copy.deepcopy(schema)
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def from_json_schema(schema: dict[str, Any]) -> str:
    import llguidance

    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    if json_depth(schema) > MAX_NESTING:
        raise GrammarError(f"the JSON schema nests deeper than {MAX_NESTING} levels")
    schema = closed_objects(schema)
    options = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE, "lenient": True}
    try:
        body = json.dumps({**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}})
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"cannot use this JSON schema: {exc}") from None
    # the converter's root rule ends with ``space`` too: one trailing space may follow
    lark = f"start: body TRAIL?\nTRAIL: /{WHITESPACE}/\nbody: %json {body}"
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _looks_like_gbnf(text: str) -> bool:
    return "::=" in text


def from_grammar(text: str) -> str:
    """A GBNF (``root ::= ...``, llama.cpp's format) or Lark (``start: ...``) grammar."""
    import llguidance
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

    if not text.strip():
        raise GrammarError("empty grammar")
    if grammar_depth(text) > MAX_NESTING:
        raise GrammarError(f"the grammar nests deeper than {MAX_NESTING} levels")
    lark = text
    if _looks_like_gbnf(text):
        try:
            lark = gbnf_to_lark(text)
        except (GbnfToLarkError, ValueError, KeyError, IndexError, RecursionError, AttributeError) as exc:
            raise GrammarError(f"invalid GBNF grammar: {exc}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def describe(schema: dict[str, Any] | None, grammar: str | None) -> str:
    """A cache key for a constraint."""
    if schema is not None:
        return "json:" + json.dumps(schema, sort_keys=True)
    return "grammar:" + (grammar or "")
