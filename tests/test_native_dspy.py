"""The DSPy adapter on the native backend: velollm.LM(backend="native-cpu") + velollm.Adapter.

The native engine has no constrained decoding, so the adapter falls back to its unconstrained
format and parses the answer from free text; usage comes from the native tokenizer.
"""

from __future__ import annotations

from typing import Literal

import dspy
import pytest

import velollm

pytestmark = pytest.mark.slow

QWEN = "qwen2.5-coder-0.5b-instruct"


class Sentiment(dspy.Signature):
    """Classify the sentiment of the review."""

    review: str = dspy.InputField()
    sentiment: Literal["positive", "negative"] = dspy.OutputField()


def test_dspy_predict_runs_on_the_native_backend() -> None:
    lm = velollm.LM(QWEN, backend="native-cpu", n_ctx=1024, n_threads=1, cache=False, max_tokens=24)
    with dspy.context(lm=lm, adapter=velollm.Adapter(), track_usage=True):
        prediction = dspy.Predict(Sentiment)(review="Absolutely wonderful: great food, friendly staff, I loved it!")
    assert prediction.sentiment == "positive"
    usage = prediction.get_lm_usage()
    entry = next(iter(usage.values()))
    assert entry["prompt_tokens"] > 20 and entry["completion_tokens"] >= 1
    # the call really went to the numpy engine
    from velollm.pool import get_pool

    pool = get_pool()
    served = [m for m in pool.status().models if m.backend == "native-cpu" and m.requests >= 1]
    assert served, pool.status().models
    pool.unload(QWEN)  # 2 GB of float32 weights: give them back to the rest of the suite
