"""Optimise a program with BootstrapFewShot on a tiny train set, then use the compiled program.

The optimiser runs the program on the train set, keeps the traces the metric accepts as
few-shot demos, and the compiled program sends them with every prediction.

    python examples/bootstrap_fewshot.py
"""

from __future__ import annotations

import dspy

import velollm


class Capital(dspy.Signature):
    """Give the capital city of the country."""

    country: str = dspy.InputField()
    capital: str = dspy.OutputField(desc="the city name only")


TRAIN = [
    dspy.Example(country="France", capital="Paris").with_inputs("country"),
    dspy.Example(country="Japan", capital="Tokyo").with_inputs("country"),
    dspy.Example(country="Italy", capital="Rome").with_inputs("country"),
]
TEST = [dspy.Example(country="Germany", capital="Berlin").with_inputs("country")]


def same_city(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    return example.capital.lower() in prediction.capital.lower()


def main() -> dspy.Module:
    dspy.configure(lm=velollm.LM(max_tokens=32), adapter=velollm.Adapter())
    optimizer = dspy.BootstrapFewShot(metric=same_city, max_bootstrapped_demos=2, max_labeled_demos=0, max_rounds=1)
    compiled = optimizer.compile(dspy.Predict(Capital), trainset=TRAIN)
    demos = ", ".join(f"{d.country}->{d.capital}" for d in compiled.demos)
    print(f"bootstrapped {len(compiled.demos)} demos: {demos}")
    for example in TEST:
        prediction = compiled(country=example.country)
        print(f"{example.country} -> {prediction.capital} (correct: {same_city(example, prediction)})")
    return compiled


if __name__ == "__main__":
    main()
