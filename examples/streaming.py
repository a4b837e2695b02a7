"""Stream one output field token by token with DSPy's StreamListener.

While a prediction streams, velollm.Adapter writes DSPy's `[[ ## field ## ]]` markers so the
listener can cut the field's text out of the token stream; the final Prediction still arrives typed.

    python examples/streaming.py
"""

from __future__ import annotations

import asyncio

import dspy

import velollm


async def run(question: str) -> dspy.Prediction:
    program = dspy.streamify(
        dspy.Predict("question -> answer"),
        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")],
    )
    final = None
    async for item in program(question=question):
        if isinstance(item, dspy.streaming.StreamResponse):
            print(item.chunk, end="", flush=True)
        elif isinstance(item, dspy.Prediction):
            final = item
    print()
    return final


def main() -> dspy.Prediction:
    dspy.configure(lm=velollm.LM(max_tokens=80), adapter=velollm.Adapter())
    prediction = asyncio.run(run("In one sentence, why is the sky blue?"))
    print(f"final answer: {prediction.answer!r}")
    return prediction


if __name__ == "__main__":
    main()
