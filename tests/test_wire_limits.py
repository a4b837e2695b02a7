"""Request fields the OpenAI wire format refuses instead of silently changing (no model needed)."""

from __future__ import annotations

from typing import Any

import pytest

from velollm import openai_wire as oc
from velollm.errors import GrammarError, InvalidRequest

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("extra", "message"), [
    ({"seed": 2**64}, "'seed' must be an integer from 0 to 4294967295"),
    ({"seed": 2**32}, "'seed' must be"),
    ({"seed": -5}, "'seed' must be"),
    ({"seed": 1.5}, "'seed' must be"),
    ({"seed": True}, "'seed' must be"),
    ({"response_format": {"type": "json_object", "schema": 123}}, "'response_format.schema' must be"),
    ({"response_format": {"type": "json_object", "schema": [1]}}, "'response_format.schema' must be"),
    ({"grammar": ""}, "the grammar is empty"),
    ({"grammar": 7}, "must be GBNF text"),
    ({"grammar": "root ::= " + "(" * 30000 + '"a"' + ")" * 30000}, "nests parentheses 30000 deep"),
    ({"stream_options": {"include_usage": True}}, "only allowed with 'stream': true"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "only allowed with 'stream': true"),
    ({"stream": "yes"}, "'stream' must be true or false"),
])
def test_invalid_fields_are_refused_by_chat_and_completions(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        oc.parse_chat({"messages": HI, **extra})
    with pytest.raises(InvalidRequest, match=message):
        oc.parse_completion({"prompt": "hi", **extra})


def test_grammar_errors_are_grammar_errors() -> None:
    with pytest.raises(GrammarError):
        oc.parse_chat({"messages": HI, "grammar": "   "})


def test_valid_edges_are_accepted() -> None:
    assert oc.parse_chat({"messages": HI, "seed": 0}).request.seed == 0
    assert oc.parse_chat({"messages": HI, "seed": oc.MAX_SEED}).request.seed == 2**32 - 1
    parsed = oc.parse_chat({"messages": HI, "stream": True, "stream_options": {"include_usage": True}})
    assert parsed.stream and parsed.include_usage
    assert oc.parse_chat({"messages": HI, "stream": False, "stream_options": None}).stream is False
    assert oc.parse_chat({"messages": HI, "response_format": {"type": "json_object"}}).request.json_schema == {
        "type": "object"}
    assert oc.parse_chat({"messages": HI, "grammar": 'root ::= "a"'}).request.grammar == 'root ::= "a"'
