"""Question answering with typed outputs: a str answer and an int answer, one LM call each.

    python examples/qa.py
"""

from __future__ import annotations

import dspy

import velollm


class FactQA(dspy.Signature):
    """Answer the question with a short fact."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words")


def main() -> list[dspy.Prediction]:
    dspy.configure(lm=velollm.LM(max_tokens=64), adapter=velollm.Adapter())
    facts = dspy.Predict(FactQA)
    count = dspy.Predict("question -> answer: int")
    results = [
        ("Which planet is known as the Red Planet?", facts),
        ("How many days are there in a week?", count),
    ]
    predictions = []
    for question, program in results:
        prediction = program(question=question)
        predictions.append(prediction)
        print(f"{question} -> {prediction.answer!r} ({type(prediction.answer).__name__})")
    return predictions


if __name__ == "__main__":
    main()
