"""velollm.Adapter's retries: parse failures go back to the model with feedback, transient backend
errors are retried with backoff, errors that cannot heal are not retried; and a schema llama.cpp
cannot take falls back to unconstrained generation with a warning."""

from __future__ import annotations

from typing import Annotated, Any

import dspy
import pydantic
import pytest
from dspy.utils.exceptions import AdapterParseError, LMServerError, LMUnsupportedModelError
from dspy_support import GEMMA, counting, lm

import velollm
from velollm.adapters.dspy.lm15 import to_lm15_error
from velollm.adapters.dspy.parsing import ParseFailure
from velollm.adapters.dspy.retry import RetryPolicy, is_transient, should_retry
from velollm.errors import GenerationError, InvalidRequest, ModelNotFound, QueueFull
from velollm.pool import get_pool, set_pool

pytestmark = pytest.mark.slow


class TwoFields(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    answer: int = dspy.OutputField()


def test_parse_failure_is_retried_with_feedback_then_raised() -> None:
    # Gemma 270M is a base model: unconstrained, it does not write the field markers
    model = lm(GEMMA, max_tokens=24)
    calls, context = counting(lm=model, adapter=velollm.Adapter(constrained=False, max_attempts=2))
    with context, pytest.raises(AdapterParseError) as info:
        dspy.Predict(TwoFields)(question="What is 2 + 3?")
    assert isinstance(info.value, ParseFailure)
    assert calls.count == 2
    first, second = calls.messages
    assert second[: len(first)] == first  # the retry repeats the request...
    previous, note = second[len(first):]  # ...then shows the unusable answer and says what was wrong
    assert previous["role"] == "assistant" and previous["content"] == model.history[0]["outputs"][0]
    assert note["role"] == "user" and "could not be used" in note["content"] and "[[ ## answer ## ]]" in note["content"]


def test_every_retry_differs_from_the_calls_before_it_and_says_how() -> None:
    model = lm(GEMMA, max_tokens=24)
    calls, context = counting(lm=model, adapter=velollm.Adapter(constrained=False, max_attempts=3))
    with context:  # Gemma writes no markers; the third attempt switches to constrained JSON, which parses
        prediction = dspy.Predict(TwoFields)(question="What is 2 + 3?")
    assert calls.count == 3 and isinstance(prediction.answer, int)
    sent = [(entry["messages"], {k: v for k, v in entry["kwargs"].items() if k != "messages"})
            for entry in model.history]
    assert len({repr(s) for s in sent}) == 3  # no two requests alike
    second, third = (entry["velollm_retry"] for entry in model.history[1:])
    assert second["attempt"] == 2 and "error fed back" in second["changes"]
    assert "max_tokens=48" in second["changes"] and sent[1][1]["max_tokens"] == 48  # the first answer was cut
    assert "format=json" in third["changes"] and "velollm_retry" not in model.history[0]


def test_retries_do_not_multiply_with_the_lms_own() -> None:
    assert should_retry(AdapterParseError("velollm.Adapter", TwoFields, "x"), lm_retries=2)
    busy = to_lm15_error(QueueFull("busy"), model="velollm/x")
    busy.__cause__ = QueueFull("busy")  # as raised by the LM: ``raise lm15_error from velollm_error``
    assert should_retry(busy, lm_retries=0) and not should_retry(busy, lm_retries=2)


def test_constrained_mode_needs_no_retry_on_the_same_model() -> None:
    model = lm(GEMMA, max_tokens=48)
    calls, context = counting(lm=model, adapter=velollm.Adapter(max_attempts=2))
    with context:
        prediction = dspy.Predict(TwoFields)(question="What is 2 + 3?")
    assert calls.count == 1 and isinstance(prediction.answer, int)


class FlakyPool:
    """The real pool, except the first ``failures`` acquisitions report a full queue."""

    def __init__(self, pool: Any, failures: int) -> None:
        self.pool, self.failures, self.attempts = pool, failures, 0

    def acquire(self, ref: str, **kwargs: Any) -> Any:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise QueueFull("all slots busy (test)")
        return self.pool.acquire(ref, **kwargs)


@pytest.mark.parametrize("warm", [True, False], ids=["generation-fails", "capability-probe-fails"])
def test_transient_backend_error_is_retried_with_backoff(warm: bool) -> None:
    model = lm(max_tokens=16, num_retries=0)  # DSPy's own retries off: the adapter's policy is under test
    if warm:
        model.capabilities()  # probed now, so the flaky acquisition below is the generation's
    flaky = FlakyPool(get_pool(), failures=1)
    old = set_pool(flaky)  # type: ignore[arg-type]
    try:
        calls, context = counting(lm=model, adapter=velollm.Adapter(backoff_s=0.01))
        with context:
            prediction = dspy.Predict("question -> answer: int")(question="What is 2 + 2?")
    finally:
        set_pool(old)
    assert prediction.answer == 4
    # generation-fails: two LM calls; capability-probe-fails: the probe is retried, one LM call
    assert (flaky.attempts, calls.count) == ((2, 2) if warm else (3, 1))


def test_errors_that_cannot_heal_are_not_retried(tmp_path: Any) -> None:
    model = velollm.LM(str(tmp_path / "missing.gguf"), cache=False)
    counter = FlakyPool(get_pool(), failures=0)  # counts acquisitions, fails none
    old = set_pool(counter)  # type: ignore[arg-type]
    try:
        with dspy.context(lm=model, adapter=velollm.Adapter(max_attempts=3, backoff_s=0.01)), \
                pytest.raises(LMUnsupportedModelError):
            dspy.Predict("question -> answer")(question="hi")
    finally:
        set_pool(old)
    assert counter.attempts == 1


def test_retry_classification() -> None:
    def wrapped(error: Exception) -> Exception:
        lm15_error = to_lm15_error(error, model="velollm/x")
        try:
            try:
                raise lm15_error from error
            except Exception as inner:
                raise LMServerError(str(inner)) from inner
        except Exception as outer:
            return outer

    assert is_transient(wrapped(GenerationError("decode failed"))) and is_transient(wrapped(QueueFull("busy")))
    assert not is_transient(wrapped(ModelNotFound("gone"))) and not is_transient(wrapped(InvalidRequest("bad")))
    assert is_transient(LMServerError("5xx from somewhere else"))
    assert should_retry(ParseFailure(TwoFields, "", velollm.adapters.dspy.parsing.ParseReport(), "empty"))
    assert not should_retry(ValueError("a bug"))
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


class Code(dspy.Signature):
    """Give the three-letter IATA code of the airport."""

    airport: str = dspy.InputField()
    code: Annotated[str, pydantic.StringConstraints(pattern=r"[A-Z]{3}")] = dspy.OutputField()


def test_schema_without_a_valid_grammar_falls_back_with_a_warning() -> None:
    # pydantic writes the pattern without ^...$, which llama.cpp's schema converter refuses
    model = lm(max_tokens=24)
    calls, context = counting(lm=model, adapter=velollm.Adapter())
    with context, pytest.warns(RuntimeWarning, match="cannot be used as a grammar"):
        prediction = dspy.Predict(Code)(airport="London Heathrow")
    assert calls.count >= 1 and isinstance(prediction.code, str) and prediction.code
    assert model.history[0]["kwargs"]["response_format"]["type"] == "json_schema"  # it was asked, then dropped
