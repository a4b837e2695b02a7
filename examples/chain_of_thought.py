"""ChainOfThought: the model writes its reasoning first, then a typed answer (one constrained call).

    python examples/chain_of_thought.py
"""

from __future__ import annotations

import dspy

import velollm


def main() -> dspy.Prediction:
    dspy.configure(lm=velollm.LM(max_tokens=160), adapter=velollm.Adapter())
    solve = dspy.ChainOfThought("question -> answer: int")
    prediction = solve(question="A box holds 6 eggs. How many eggs are in 3 boxes?")
    print(f"reasoning: {prediction.reasoning}")
    print(f"answer:    {prediction.answer}")
    return prediction


if __name__ == "__main__":
    main()
