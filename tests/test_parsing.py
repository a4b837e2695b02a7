"""The parse strategies on the kind of output small models really write (no model needed)."""

from __future__ import annotations

from typing import Literal

import dspy
import pydantic
import pytest
from dspy.utils.exceptions import AdapterParseError

from velollm.adapters.dspy.parsing import (
    ParseFailure,
    find_json_object,
    find_markers,
    match_keys,
    parse_completion,
)


class QA(dspy.Signature):
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Reasoned(dspy.Signature):
    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    answer: int = dspy.OutputField()


class Label(dspy.Signature):
    text: str = dspy.InputField()
    label: Literal["positive", "negative", "neutral"] = dspy.OutputField()


class Person(pydantic.BaseModel):
    name: str
    age: int


class Extract(dspy.Signature):
    text: str = dspy.InputField()
    person: Person = dspy.OutputField()


class Kinds(dspy.Signature):
    text: str = dspy.InputField()
    ratio: float = dspy.OutputField()
    ok: bool = dspy.OutputField()
    tags: list[str] = dspy.OutputField()


class Optional_(dspy.Signature):
    text: str = dspy.InputField()
    answer: str = dspy.OutputField()
    note: str | None = dspy.OutputField()


# --- strategy 1: markers -------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]",
    "Sure! Here you go.\n[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]\nHope this helps!",
    "[[## Answer ##]]: Paris",
    "[[ ## answer ## ]] Paris\n[[ ## completed ## ]]",
    "## answer ##\nParis",
    "[ ## answer ## ]]\nParis",
])
def test_marker_variants(text: str) -> None:
    assert parse_completion(QA, text) == {"answer": "Paris"}


def test_markers_two_fields_typed_and_first_occurrence_wins() -> None:
    text = ("[[ ## reasoning ## ]]\n3 + 4 makes 7.\n\n[[ ## answer ## ]]\n7\n\n[[ ## completed ## ]]\n"
            "[[ ## answer ## ]]\n9")
    assert parse_completion(Reasoned, text) == {"reasoning": "3 + 4 makes 7.", "answer": 7}


def test_markers_ignore_echoed_inputs_and_markdown_headings_in_values() -> None:
    text = ("[[ ## question ## ]]\nWhat is it?\n[[ ## answer ## ]]\n## Summary\nIt is Paris.\n"
            "[[ ## completed ## ]]")
    assert parse_completion(QA, text) == {"answer": "## Summary\nIt is Paris."}


def test_marker_with_json_value_for_typed_field() -> None:
    text = '[[ ## reasoning ## ]]\nadd them\n[[ ## answer ## ]]\n{"answer": 7}'
    assert parse_completion(Reasoned, text) == {"reasoning": "add them", "answer": 7}


def test_find_markers_normalizes_names() -> None:
    sections = find_markers("[[ ## Final-Answer ## ]]\nx\n[[ ## completed ## ]]")
    assert sections == [("final_answer", "x"), ("completed", "")]


# --- strategy 2: JSON ----------------------------------------------------------------------------
def test_json_inside_prose() -> None:
    text = 'Here is my answer: {"reasoning": "3 plus 4", "answer": 7} -- thanks!'
    assert parse_completion(Reasoned, text) == {"reasoning": "3 plus 4", "answer": 7}


def test_json_in_code_fence_with_case_mismatched_keys() -> None:
    text = '```json\n{"Reasoning": "count", "ANSWER": "7"}\n```'
    assert parse_completion(Reasoned, text) == {"reasoning": "count", "answer": 7}


def test_truncated_json_is_repaired() -> None:
    text = '{"reasoning": "3 plus 4 is 7", "answer": 7, "extra": "cut off he'
    assert parse_completion(Reasoned, text) == {"reasoning": "3 plus 4 is 7", "answer": 7}


def test_wrong_field_name_maps_by_spelling_or_as_lone_leftover() -> None:
    assert parse_completion(Reasoned, '{"reasonning": "add", "answer": 7}')["reasoning"] == "add"
    assert parse_completion(Reasoned, '{"thoughts": "add", "answer": 7}') == {"reasoning": "add", "answer": 7}
    assert parse_completion(Label, '{"sentiment": "negative"}') == {"label": "negative"}


def test_pydantic_field_nested_or_flattened() -> None:
    nested = parse_completion(Extract, 'Result: {"person": {"name": "Ann", "age": "31"}}')
    flat = parse_completion(Extract, '{"name": "Ann", "age": 31}')
    assert nested == flat == {"person": Person(name="Ann", age=31)}
    assert isinstance(flat["person"], Person)


def test_float_bool_list_values() -> None:
    out = parse_completion(Kinds, '{"ratio": "0.25", "ok": "true", "tags": ["a", "b"]}')
    assert out == {"ratio": 0.25, "ok": True, "tags": ["a", "b"]}
    assert type(out["ratio"]) is float and out["ok"] is True


def test_first_json_object_skips_non_objects() -> None:
    assert find_json_object('noise [1, 2] then {"a": {"b": 1}} and {"c": 2}') == {"a": {"b": 1}}
    assert find_json_object("no braces at all") is None


def test_match_keys_does_not_guess_between_two_leftovers() -> None:
    assert match_keys({"x": 1, "y": 2}, ["reasoning", "answer"]) == {}


# --- strategy 3: single field --------------------------------------------------------------------
def test_single_field_takes_whole_text() -> None:
    assert parse_completion(QA, "  The capital of France is Paris.  ") == {"answer": "The capital of France is Paris."}
    assert parse_completion(QA, "Paris\n[[ ## completed ## ]]\ntrailing junk") == {"answer": "Paris"}


def test_single_literal_tolerates_case_and_punctuation() -> None:
    assert parse_completion(Label, "Positive.") == {"label": "positive"}
    assert parse_completion(Label, "'neutral'") == {"label": "neutral"}


def test_single_int_from_sentence_with_one_number_only() -> None:
    class Count(dspy.Signature):
        question: str = dspy.InputField()
        answer: int = dspy.OutputField()

    assert parse_completion(Count, "The answer is 8.") == {"answer": 8}
    with pytest.raises(ParseFailure) as info:
        parse_completion(Count, "3 + 5 = 8")  # three numbers: which one? refuse to guess
    assert "answer" in info.value.invalid


# --- failures ------------------------------------------------------------------------------------
def test_empty_output_raises_adapter_parse_error() -> None:
    with pytest.raises(AdapterParseError) as info:
        parse_completion(Reasoned, "")
    assert info.value.missing == ["reasoning", "answer"]
    assert "empty" in str(info.value)


def test_failure_reports_found_missing_and_invalid() -> None:
    with pytest.raises(ParseFailure) as info:
        parse_completion(Reasoned, '{"reasoning": "it is many"')
    assert info.value.found == {"reasoning": "it is many"}
    assert info.value.missing == ["answer"]
    assert "Missing `answer`" in str(info.value)

    with pytest.raises(ParseFailure) as info:
        parse_completion(Label, '{"label": "furious"}')
    assert "label" in info.value.invalid and "furious" in info.value.invalid["label"]


def test_literal_out_of_set_is_not_accepted() -> None:
    with pytest.raises(ParseFailure):
        parse_completion(Label, "[[ ## label ## ]]\nangry")


def test_optional_field_may_be_missing() -> None:
    assert parse_completion(Optional_, '{"answer": "yes"}') == {"answer": "yes", "note": None}


# --- "Field: value" lines ---------------------------------------------------------------------------
def test_field_lines_are_a_strategy_after_markers_and_json() -> None:
    text = "Sure!\nReasoning: 3 apples plus 4 apples\nmakes 7 apples.\nANSWER: 7\n"
    values = parse_completion(Reasoned, text)
    assert values == {"reasoning": "3 apples plus 4 apples\nmakes 7 apples.", "answer": 7}
    assert parse_completion(Label, "**Label**: Positive.") == {"label": "positive"}
    assert parse_completion(Reasoned, "- reasoning: two and two\n- answer: 4") == {"reasoning": "two and two",
                                                                                   "answer": 4}


def test_field_lines_do_not_override_markers_or_json_and_skip_input_names() -> None:
    marked = "[[ ## reasoning ## ]]\nfrom markers\n[[ ## answer ## ]]\n5\n[[ ## completed ## ]]\nAnswer: 9"
    assert parse_completion(Reasoned, marked)["answer"] == 5
    # an echoed input line ends the value before it and is not an output
    echoed = "Question: what is 2+2?\nReasoning: add them\nQuestion: again?\nAnswer: 4"
    assert parse_completion(Reasoned, echoed) == {"reasoning": "add them", "answer": 4}
    with pytest.raises(ParseFailure):
        parse_completion(Reasoned, "Reasoning: only this field")
