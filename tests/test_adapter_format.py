"""What velollm.Adapter sends (no model needed): the output schema and the two prompt formats."""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

import dspy
import pydantic
import pytest

import velollm
from velollm.adapters.dspy.schema import SchemaUnavailable, output_schema, response_format


class Item(pydantic.BaseModel):
    name: str
    qty: int


class Order(dspy.Signature):
    """Read the order."""

    text: str = dspy.InputField()
    reasoning: dspy.Reasoning = dspy.OutputField()
    items: list[Item] = dspy.OutputField()
    urgent: bool = dspy.OutputField()
    channel: Literal["email", "phone"] = dspy.OutputField()
    code: Annotated[str, pydantic.StringConstraints(max_length=5)] = dspy.OutputField()


def test_schema_keeps_order_requires_everything_and_closes_objects() -> None:
    schema = output_schema(Order)
    assert list(schema["properties"]) == ["reasoning", "items", "urgent", "channel", "code"]
    assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False
    assert schema["properties"]["reasoning"] == {"type": "string"}  # Reasoning is text to DSPy
    assert schema["properties"]["channel"]["enum"] == ["email", "phone"]
    assert schema["properties"]["code"]["maxLength"] == 5  # field constraints survive
    item = schema["$defs"]["Item"]
    assert item["additionalProperties"] is False and item["required"] == ["name", "qty"]
    fmt = response_format(Order)
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema


def test_schema_unavailable_for_types_without_one() -> None:
    class Opaque:
        pass

    class Weird(dspy.Signature):
        question: str = dspy.InputField()
        thing: Opaque = dspy.OutputField()

    with pytest.raises(SchemaUnavailable):
        output_schema(Weird)


class QA(dspy.Signature):
    """Answer briefly."""

    question: str = dspy.InputField()
    answer: int = dspy.OutputField()


DEMOS = [{"question": "1 + 1?", "answer": 2}]


def test_json_format_asks_for_json_and_shows_demos_as_json() -> None:
    messages = velollm.Adapter().format(QA, DEMOS, {"question": "2 + 2?"})
    system, demo_user, demo_assistant, user = messages
    assert "Outputs will be a JSON object" in system["content"] and "Answer briefly." in system["content"]
    assert "[[ ## question ## ]]" in demo_user["content"]
    assert json.loads(demo_assistant["content"]) == {"answer": 2}
    # the requirements come first: the same on every call, the prompt cache serves them (issue: parallel decoding)
    assert user["content"].startswith("Respond with a JSON object") and user["content"].endswith(
        "[[ ## question ## ]]\n2 + 2?")
    assert "`answer` (must be formatted as a valid Python int)" in user["content"]


def test_every_call_of_a_program_shares_the_prompt_up_to_its_inputs() -> None:
    """Two calls differ only from their inputs on, so the prefix cache serves demos and requirements."""
    first = velollm.Adapter().format(QA, DEMOS, {"question": "2 + 2?"})
    second = velollm.Adapter().format(QA, DEMOS, {"question": "What is the square root of 81?"})
    assert first[:-1] == second[:-1]
    a, b = first[-1]["content"], second[-1]["content"]
    shared = len(os.path.commonprefix([a, b]))
    assert a[shared:] == "2 + 2?" and b[shared:] == "What is the square root of 81?"


def test_chain_of_thought_puts_the_requirements_after_the_inputs() -> None:
    """ChainOfThought's reasoning comes first: DSPy's order, the requirements line closing the turn
    (a small model reasons towards what it read last)."""
    cot = dspy.ChainOfThought(QA).predict.signature
    first = velollm.Adapter().format(cot, DEMOS, {"question": "2 + 2?"})[-1]["content"]
    assert first.startswith("[[ ## question ## ]]\n2 + 2?\n\n")
    assert "\n\nRespond with a JSON object in the following order of fields: `reasoning`, then `answer`" in first
    assert first == dspy.JSONAdapter().format(cot, DEMOS, {"question": "2 + 2?"})[-1]["content"]


def test_free_text_first_ends_the_turn_with_a_cue_after_the_inputs() -> None:
    """A string answer comes first: a short cue follows the inputs (a small model's free text copies
    what it read last), and the requirements stay ahead where the cache serves them."""
    from velollm.adapters.dspy.adapter import FREE_TEXT_CUE

    class Capital(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        confidence: float = dspy.OutputField()

    first = velollm.Adapter().format(Capital, [], {"question": "Capital of Peru?"})[-1]["content"]
    second = velollm.Adapter().format(Capital, [], {"question": "Capital of Chile?"})[-1]["content"]
    assert first.startswith("Respond with a JSON object in the following order of fields: `answer`, then `confidence`")
    assert first.endswith("[[ ## question ## ]]\nCapital of Peru?\n\n" + FREE_TEXT_CUE)
    assert os.path.commonprefix([first, second]) == first[:first.index("Peru?")]
    plain = velollm.Adapter().format(QA, DEMOS, {"question": "2 + 2?"})[-1]["content"]
    assert FREE_TEXT_CUE not in plain and plain.startswith("Respond with a JSON object")  # a typed first output


def test_marker_format_matches_chat_adapter() -> None:
    ours = velollm.Adapter(constrained=False).format(QA, DEMOS, {"question": "2 + 2?"})
    assert ours == dspy.ChatAdapter().format(QA, DEMOS, {"question": "2 + 2?"})


def test_history_becomes_turns_in_the_call_format() -> None:
    class Chat(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        answer: str = dspy.OutputField()

    history = dspy.History(messages=[{"question": "Hi, I am Bo.", "answer": "Hello Bo!"}])
    messages = velollm.Adapter().format(Chat, [], {"question": "Who am I?", "history": history})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert json.loads(messages[2]["content"]) == {"answer": "Hello Bo!"}
    assert "history" not in messages[3]["content"]


def test_invalid_adapter_options() -> None:
    with pytest.raises(ValueError):
        velollm.Adapter(unconstrained_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        velollm.Adapter(max_attempts=0)
