"""Classification into a fixed label set: the Literal type becomes a grammar, so only a label comes out.

    python examples/classification.py
"""

from __future__ import annotations

from typing import Literal

import dspy

import velollm


class Sentiment(dspy.Signature):
    """Classify the sentiment of a product review."""

    review: str = dspy.InputField()
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()


REVIEWS = [
    "Absolutely love it, works perfectly and arrived early!",
    "Broke after two days. Waste of money.",
]


def main() -> list[str]:
    dspy.configure(lm=velollm.LM(max_tokens=32), adapter=velollm.Adapter())
    classify = dspy.Predict(Sentiment)
    labels = []
    for review in REVIEWS:
        label = classify(review=review).sentiment
        labels.append(label)
        print(f"{label:>8}  {review}")
    return labels


if __name__ == "__main__":
    main()
