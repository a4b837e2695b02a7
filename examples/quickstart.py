"""The smallest velollm program: one DSPy prediction answered by a local GGUF model.

    python examples/quickstart.py ["your question"]

The model (Qwen2.5-Coder 0.5B Instruct, ~400 MB) is pulled on first use; `make demo` pulls it first.
"""

from __future__ import annotations

import sys
import time

import dspy

import velollm


def main(question: str = "What is the capital of France?") -> dspy.Prediction:
    # cache=False: every run really generates (DSPy would otherwise answer a repeat from its cache)
    lm = velollm.LM("qwen2.5-coder-0.5b-instruct", max_tokens=64, cache=False)
    dspy.configure(lm=lm, adapter=velollm.Adapter(), track_usage=True)
    start = time.perf_counter()
    prediction = dspy.Predict("question -> answer")(question=question)
    seconds = time.perf_counter() - start
    usage = next(iter(prediction.get_lm_usage().values()), {})
    print(f"Q: {question}")
    print(f"A: {prediction.answer}")
    print(f"   ({usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion tokens, "
          f"{seconds:.1f}s including the model load)")
    return prediction


if __name__ == "__main__":
    main(*sys.argv[1:2])
