"""Fill-in-the-middle: ``/v1/completions`` with ``prompt`` + ``suffix`` on Qwen2.5-Coder (FIM tokens), and a
clear refusal for Gemma (none)."""

from __future__ import annotations

import ast

import pytest

from velollm import openai_wire
from velollm.chat_templates import fim_tokens
from velollm.engine import Engine, GenerationRequest
from velollm.errors import InvalidRequest, UnsupportedFeature

SNIPPETS = [
    ("def add(a, b):\n    return ", "\n\n\nprint(add(1, 2))\n"),
    ("def is_even(n):\n    ", "\n\n\nassert is_even(4)\n"),
    ("numbers = [1, 2, 3, 4]\nsquares = ", "\nprint(squares)\n"),
    ("def greet(name):\n    message = ", "\n    return message\n"),
    ("class Point:\n    def __init__(self, x, y):\n",
     "\n\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n"),
]


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def test_the_holes_are_real() -> None:
    assert not any(_parses(prefix + suffix) for prefix, suffix in SNIPPETS[1:])  # the first one is `return`


def test_qwen_coder_fills_the_middle(qwen_engine: Engine) -> None:
    assert qwen_engine.capabilities.fill_in_middle
    assert fim_tokens(qwen_engine.tokenize) == ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    good = []
    for prefix, suffix in SNIPPETS:
        [parsed] = openai_wire.parse_completion({"prompt": prefix, "suffix": suffix, "max_tokens": 64,
                                                 "temperature": 0})
        openai_wire.check_for_engine(parsed.request, qwen_engine)
        middle = qwen_engine.generate(parsed.request).text
        print(f"\n{prefix!r} [{middle!r}] {suffix!r}")
        assert "<|fim" not in middle
        good.append(_parses(prefix + middle + suffix))
    assert sum(good) >= 4, good


def test_gemma_has_no_fim_tokens_and_says_so(gemma_engine: Engine) -> None:
    assert not gemma_engine.capabilities.fill_in_middle
    [parsed] = openai_wire.parse_completion({"prompt": "def f():\n", "suffix": "\n", "max_tokens": 4})
    with pytest.raises(UnsupportedFeature, match="fill-in-the-middle"):
        openai_wire.check_for_engine(parsed.request, gemma_engine)
    with pytest.raises(UnsupportedFeature, match="fill-in-the-middle"):
        gemma_engine.generate(parsed.request)


def test_the_middle_stops_where_it_runs_into_the_suffix() -> None:
    assert openai_wire.fim_stops("\n\n    return message\n") == ["\n    return message\n"]
    assert openai_wire.fim_stops("  \n\n") == []
    [parsed] = openai_wire.parse_completion({"prompt": "x = ", "suffix": "\nprint(x)\n", "stop": ["END"]})
    assert parsed.request.stop == ["END", "\nprint(x)\n"]


def test_suffix_needs_a_prompt_and_text() -> None:
    with pytest.raises(InvalidRequest):
        GenerationRequest(messages=[{"role": "user", "content": "x"}], suffix="y")
    with pytest.raises(InvalidRequest):
        openai_wire.parse_completion({"prompt": "x", "suffix": 3})
