"""Request limits (velollm.limits): grammars and JSON bodies are measured without recursion."""

from __future__ import annotations

import json
import sys

import pytest

from velollm import limits
from velollm.errors import GrammarError, InvalidRequest

DEEP = 30_000


def test_json_depth_skips_strings_and_escapes() -> None:
    assert limits.json_depth(b'{"a": [1, {"b": "[[[{{{"}], "c": "\\"]]"}') == 3
    assert limits.json_depth(b"[]") == 1 and limits.json_depth(b'"x"') == 0 and limits.json_depth(b"") == 0


def test_a_body_nested_30000_deep_is_refused_before_json_recurses() -> None:
    raw = b"[" * DEEP + b"]" * DEEP
    with pytest.raises(RecursionError):  # what the server did before the check: a 500
        json.loads(raw)
    with pytest.raises(InvalidRequest, match="nested 30000 levels deep; the limit is 128"):
        limits.check_json_body(raw)
    limits.check_json_body(b'{"messages": [{"role": "user", "content": "' + b"[" * DEEP + b'"}]}')  # text, not depth


def test_a_body_over_the_size_limit_is_refused() -> None:
    with pytest.raises(limits.BodyTooLarge, match="the limit is 10"):
        limits.check_json_body(b'"' + b"x" * 20 + b'"', max_bytes=10)


def test_lone_surrogates_are_found_anywhere_in_a_body() -> None:
    limits.check_no_surrogates({"messages": [{"content": "caf\u00e9 \U0001f600"}]})
    with pytest.raises(InvalidRequest, match=r"^messages\[0\].content contains a lone surrogate \(U\+D800"):
        limits.check_no_surrogates({"messages": [{"content": "a\ud800b"}]})
    with pytest.raises(InvalidRequest, match="a key"):
        limits.check_no_surrogates({"\udfff": 1})
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        limits.check_no_surrogates(json.loads('{"model": "\\ud83d"}'))


@pytest.mark.parametrize(("gbnf", "message"), [
    ("", "empty"),
    ("   \n", "empty"),
    (None, "must be GBNF text"),
    ('root ::= "a\ud800"', "lone surrogate"),
    ('root ::= ' + "(" * DEEP + '"a"' + ")" * DEEP, "nests parentheses 30000 deep; the limit is 256"),
    ('root ::= "' + "x" * (limits.MAX_GRAMMAR_BYTES + 1) + '"', "bytes; the limit is"),
    ("\n".join(f'r{i} ::= "x" r{i + 1}' for i in range(5000)), "5,000 rules"),
    ('root ::= "a"{0,100000}', "repeats up to 100,000 times"),
    ('root ::= "a"{' + "9" * 5000 + "}", "repeats up to"),
])
def test_grammars_refused_with_the_reason(gbnf: object, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        limits.check_grammar(gbnf)


def test_lark_grammars_pass_the_checks() -> None:
    limits.check_grammar('start: "yes" | "no"')
    limits.check_grammar("start: item+\nitem: /[a-z]+/ \" \"")


def test_grammar_depth_ignores_parentheses_in_literals_classes_and_comments() -> None:
    gbnf = 'root ::= ("(((" [()\\]] )  # ((((((\nx ::= "\\")" ( ( "a" ) )'
    assert limits.grammar_shape(gbnf) == (2, 2, 0)
    limits.check_grammar('root ::= "{" ws ( "a" | "b" ){1,3} "}"\nws ::= [ \\t\\n]*')


def test_the_scan_does_not_recurse() -> None:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a recursive scanner would fail long before 30,000 levels
    try:
        assert limits.grammar_shape("root ::= " + "(" * DEEP + '"a"' + ")" * DEEP)[0] == DEEP
        assert limits.json_depth(b"{" * DEEP) == DEEP
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.parametrize("content_type", [None, "", "application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_media_types_are_accepted(content_type: str | None) -> None:
    assert limits.parse_json_body(b'{"a": 1}', content_type) == {"a": 1}


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_other_media_types_are_refused(content_type: str) -> None:
    with pytest.raises(limits.UnsupportedMediaType, match="Content-Type: application/json"):
        limits.parse_json_body(b'{"a": 1}', content_type)


def test_parse_json_body_refuses_bad_json_deep_json_and_surrogates() -> None:
    with pytest.raises(limits.InvalidJSON):
        limits.parse_json_body(b"{not json")
    with pytest.raises(limits.InvalidJSON):
        limits.parse_json_body(b'"\xff"')
    with pytest.raises(InvalidRequest, match="nested"):
        limits.parse_json_body(b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(InvalidRequest, match=r"prompt contains a lone surrogate"):
        limits.parse_json_body(b'{"prompt": "a\\ud800b"}')
