"""velollm.Adapter's acceptance suite on real models, constrained decoding on (the default).

Qwen 0.5B Instruct: the eleven cases of ``benchmarks/adapter_suite.py`` (str, Literal, int,
float, bool, list[str], pydantic, two fields, ChainOfThought, demos, History) must all parse,
typed, in exactly one LM call each. Gemma 270M is a base model that follows no prompt format:
constrained decoding must still give parseable, typed predictions.
"""

from __future__ import annotations

from typing import Literal

import dspy
import pydantic
import pytest
from dspy_support import GEMMA, adapter_suite, lm

import velollm

pytestmark = pytest.mark.slow


def test_qwen_suite_parses_typed_in_one_call_each() -> None:
    suite = adapter_suite()
    model = lm(max_tokens=160)
    outcomes = [suite.run_case(case, model, velollm.Adapter()) for case in suite.CASES]
    report = {o.case: (o.values or o.error, o.lm_calls) for o in outcomes}
    assert not [o.case for o in outcomes if o.parse_failure], report
    assert all(o.lm_calls == 1 for o in outcomes), report
    assert all(o.typed for o in outcomes), report
    # greedy decoding is deterministic: a drop here means prompts or parsing got worse
    assert sum(o.correct for o in outcomes) >= 9, report


class Person(pydantic.BaseModel):
    name: str
    age: int


class Facts(dspy.Signature):
    """Read the text and fill in the fields."""

    text: str = dspy.InputField()
    person: Person = dspy.OutputField()
    mood: Literal["happy", "sad"] = dspy.OutputField()
    pets: int = dspy.OutputField()
    likes_tea: bool = dspy.OutputField()


def test_gemma_base_model_gives_typed_predictions_when_constrained() -> None:
    model = lm(GEMMA, max_tokens=96)
    with dspy.context(lm=model, adapter=velollm.Adapter()):
        facts = dspy.Predict(Facts)(text="Tom is 40. He is happy, has 2 cats and drinks tea every day.")
        count = dspy.Predict("question -> answer: float")(question="What is 1.5 plus 1.5?")
        words = dspy.Predict("topic -> keywords: list[str]")(topic="the ocean")
    assert len(model.history) == 3  # one call per prediction, no retries
    assert isinstance(facts.person, Person) and isinstance(facts.person.age, int)
    assert facts.mood in ("happy", "sad") and isinstance(facts.pets, int) and isinstance(facts.likes_tea, bool)
    assert isinstance(count.answer, float)
    assert isinstance(words.keywords, list) and all(isinstance(w, str) for w in words.keywords)
