"""velollm.Adapter vs DSPy's ChatAdapter and JSONAdapter on one small suite, same model, greedy.

Each case is one prediction covering one output shape (str, Literal, int, float, bool,
list[str], a pydantic model, two fields, ChainOfThought, few-shot demos, History). For each
adapter the table counts correct answers, parse failures (the prediction raised
``AdapterParseError``) and LM calls (DSPy history entries; the response cache is off, so every
entry is a real generation). Goal for velollm.Adapter with constrained decoding: no parse
failures and one LM call per prediction.

velollm.LM offers structured outputs (a response schema becomes a grammar), which DSPy's
JSONAdapter uses too, and ChatAdapter's JSON fallback with it; the "no schema" rows run DSPy's
adapters on ``velollm.LM(structured_outputs=False)``, as they would run on a server without
grammar support.

    .venv/bin/python benchmarks/adapter_suite.py [--model REF] [--json]

``tests/test_adapter_suite.py`` runs the same cases through velollm.Adapter as a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import dspy
import pydantic

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


class Person(pydantic.BaseModel):
    name: str
    age: int


class Sentiment(dspy.Signature):
    """Classify the sentiment of the review."""

    review: str = dspy.InputField()
    sentiment: Literal["positive", "negative"] = dspy.OutputField()


class Fruits(dspy.Signature):
    """Extract every fruit mentioned in the text."""

    text: str = dspy.InputField()
    fruits: list[str] = dspy.OutputField()


class ExtractPerson(dspy.Signature):
    """Extract the person described in the text."""

    text: str = dspy.InputField()
    person: Person = dspy.OutputField()


class CityFacts(dspy.Signature):
    """Give the country a city is in and its continent."""

    city: str = dspy.InputField()
    country: str = dspy.OutputField()
    continent: Literal["Africa", "Asia", "Europe", "North America", "South America", "Oceania"] = dspy.OutputField()


class Antonym(dspy.Signature):
    """Give the antonym of the word."""

    word: str = dspy.InputField()
    antonym: str = dspy.OutputField()


class Chat(dspy.Signature):
    """Answer the user, using the conversation so far."""

    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


def _has(*words: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and all(w in value.lower() for w in words)


@dataclass
class Case:
    """One prediction: how to build the program, its inputs, and which output fields to check."""

    name: str
    build: Callable[[], dspy.Module]
    inputs: dict[str, Any]
    checks: dict[str, Callable[[Any], bool]]
    types: dict[str, type] = field(default_factory=dict)

    def correct(self, prediction: dspy.Prediction) -> bool:
        return all(check(prediction.get(name)) for name, check in self.checks.items())

    def typed(self, prediction: dspy.Prediction) -> bool:
        return all(isinstance(prediction.get(name), kind) for name, kind in self.types.items())


def _demos_program() -> dspy.Module:
    program = dspy.Predict(Antonym)
    program.demos = [dspy.Example(word="hot", antonym="cold"), dspy.Example(word="big", antonym="small")]
    return program


CASES: list[Case] = [
    Case("str", lambda: dspy.Predict("question -> answer"), {"question": "What is the capital of France?"},
         {"answer": _has("paris")}, {"answer": str}),
    Case("Literal", lambda: dspy.Predict(Sentiment), {"review": "I absolutely loved this film, it was wonderful!"},
         {"sentiment": lambda v: v == "positive"}, {"sentiment": str}),
    Case("int", lambda: dspy.Predict("question -> answer: int"), {"question": "What is 12 + 30?"},
         {"answer": lambda v: v == 42}, {"answer": int}),
    Case("float", lambda: dspy.Predict("question -> answer: float"), {"question": "What is 7 divided by 2?"},
         {"answer": lambda v: v == 3.5}, {"answer": float}),
    Case("bool", lambda: dspy.Predict("question -> answer: bool"), {"question": "Is 10 an even number?"},
         {"answer": lambda v: v is True}, {"answer": bool}),
    Case("list[str]", lambda: dspy.Predict(Fruits), {"text": "I bought apples, bananas and cherries at the market."},
         {"fruits": lambda v: isinstance(v, list) and {f.lower().rstrip("s") for f in v} >= {"apple", "banana"}},
         {"fruits": list}),
    Case("pydantic", lambda: dspy.Predict(ExtractPerson), {"text": "Maria is a 34 year old engineer from Spain."},
         {"person": lambda v: isinstance(v, Person) and v.name == "Maria" and v.age == 34}, {"person": Person}),
    Case("two fields", lambda: dspy.Predict(CityFacts), {"city": "Tokyo"},
         {"country": _has("japan"), "continent": lambda v: v == "Asia"}, {"country": str, "continent": str}),
    Case("ChainOfThought", lambda: dspy.ChainOfThought("question -> answer: int"),
         {"question": "Tom has 3 apples and buys 5 more. How many apples does he have now?"},
         {"answer": lambda v: v == 8}, {"reasoning": str, "answer": int}),
    Case("demos", _demos_program, {"word": "fast"}, {"antonym": _has("slow")}, {"antonym": str}),
    Case("History", lambda: dspy.Predict(Chat),
         {"question": "What is my name?",
          "history": dspy.History(messages=[{"question": "Hello, my name is Alice.", "answer": "Nice to meet you!"}])},
         {"answer": _has("alice")}, {"answer": str}),
]


@dataclass
class Outcome:
    case: str
    correct: bool
    parse_failure: bool
    typed: bool
    lm_calls: int
    seconds: float
    values: dict[str, Any]
    error: str = ""


def run_case(case: Case, lm: dspy.LM, adapter: dspy.Adapter) -> Outcome:
    """One prediction with ``adapter``; counts the LM calls it took (cache must be off)."""
    before = len(lm.history)
    start = time.perf_counter()
    with dspy.context(lm=lm, adapter=adapter):
        try:
            prediction = case.build()(**case.inputs)
        except dspy.utils.exceptions.AdapterParseError as exc:
            return Outcome(case.name, False, True, False, len(lm.history) - before, time.perf_counter() - start,
                           {}, str(exc).splitlines()[0])
    values = {k: v for k, v in prediction.items() if k in case.checks or k in case.types}
    return Outcome(case.name, case.correct(prediction), False, case.typed(prediction), len(lm.history) - before,
                   time.perf_counter() - start, values)


def adapters() -> dict[str, tuple[Callable[[], dspy.Adapter], bool]]:
    """label -> (adapter factory, whether the LM offers structured outputs to the adapter)."""
    import velollm

    return {
        "velollm.Adapter (constrained)": (velollm.Adapter, True),
        "velollm.Adapter (constrained=False)": (lambda: velollm.Adapter(constrained=False), True),
        "dspy.ChatAdapter": (dspy.ChatAdapter, True),
        "dspy.JSONAdapter": (dspy.JSONAdapter, True),
        "dspy.ChatAdapter, no schema": (dspy.ChatAdapter, False),
        "dspy.JSONAdapter, no schema": (dspy.JSONAdapter, False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: velollm's choice)")
    parser.add_argument("--only", nargs="*", help="adapter names (substring match)")
    parser.add_argument("--json", action="store_true", help="print the raw outcomes as JSON too")
    args = parser.parse_args(argv)

    import velollm

    lms = {schema: velollm.LM(args.model, cache=False, temperature=0.0, max_tokens=args.max_tokens,
                              n_threads=args.threads, structured_outputs=schema) for schema in (True, False)}
    rows, raw = [], {}
    for label, (make, schema) in adapters().items():
        if args.only and not any(o in label for o in args.only):
            continue
        outcomes = [run_case(case, lms[schema], make()) for case in CASES]
        raw[label] = [o.__dict__ for o in outcomes]
        rows.append((label, sum(o.correct for o in outcomes), sum(o.parse_failure for o in outcomes),
                     sum(o.lm_calls for o in outcomes), max(o.lm_calls for o in outcomes),
                     sum(o.seconds for o in outcomes)))
        for o in outcomes:
            mark = "ok " if o.correct else ("PARSE" if o.parse_failure else "wrong")
            print(f"  [{label}] {o.case:15s} {mark} calls={o.lm_calls} {o.seconds:5.1f}s {o.values or o.error}",
                  file=sys.stderr)

    n = len(CASES)
    print(f"\nmodel {args.model}, greedy, {n} predictions per adapter, DSPy cache off\n")
    print(f"| {'adapter':38s} | correct | parse failures | LM calls | max calls/pred | seconds |")
    print(f"|{'-' * 40}|---------|----------------|----------|----------------|---------|")
    for label, correct, failures, calls, most, seconds in rows:
        cells = f"{correct:>3d}/{n:<3d} | {failures:>14d} | {calls:>8d} | {most:>14d} | {seconds:>7.1f}"
        print(f"| {label:38s} | {cells} |")
    if args.json:
        print(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
