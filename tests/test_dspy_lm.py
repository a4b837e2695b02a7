"""velollm.LM on DSPy's engine protocol, against the real Qwen 0.5B model through the pool."""

from __future__ import annotations

import asyncio
import uuid

import dspy
import pytest
from dspy import lm15
from dspy.clients.cache import Cache
from dspy.utils.exceptions import ContextWindowExceededError, LMUnsupportedModelError
from dspy_support import N_CTX, N_THREADS, QWEN, lm

import velollm
from velollm.adapters.dspy.lm15 import to_generation_request, velollm_cause
from velollm.errors import InvalidRequest, ModelNotFound, UnsupportedFeature

pytestmark = pytest.mark.slow


# --- construction and conversion (no generation) -------------------------------------------------
def test_model_string_and_bad_references() -> None:
    assert velollm.LM(f"velollm/{QWEN}").model == f"velollm/{QWEN}" == velollm.LM(QWEN).model
    assert velollm.LM(QWEN).ref == QWEN
    with pytest.raises(ModelNotFound, match="unknown model"):
        velollm.LM("no-such-model-anywhere")
    with pytest.raises(InvalidRequest, match="load options"):
        velollm.LM(QWEN, n_ctx=3)


def test_request_conversion_carries_every_option() -> None:
    request = lm15.request_from_openai_chat({
        "model": "velollm/x",
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}],
        "temperature": 0.3, "top_p": 0.5, "top_k": 7, "seed": 11, "max_tokens": 9, "stop": ["\n\n"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}},
    })
    gen = to_generation_request(request)
    assert [m.role for m in gen.messages] == ["system", "user", "assistant", "user"]
    assert (gen.temperature, gen.top_p, gen.top_k, gen.seed, gen.max_tokens, gen.stop) == (0.3, 0.5, 7, 11, 9, ["\n\n"])
    assert gen.json_schema == {"type": "object"}

    raw = lm15.Request(model="velollm/x", messages=(lm15.Message.user("hi"),),
                       config=lm15.Config(extensions={"min_p": 0.2, "repeat_penalty": 1.1}))
    assert (to_generation_request(raw).min_p, to_generation_request(raw).repeat_penalty) == (0.2, 1.1)
    with pytest.raises(UnsupportedFeature, match="extension"):
        to_generation_request(lm15.Request(model="velollm/x", messages=(lm15.Message.user("hi"),),
                                           config=lm15.Config(extensions={"mirostat": 2})))
    with pytest.raises(InvalidRequest):
        to_generation_request(lm15.Request(model="velollm/x", messages=(lm15.Message.user("hi"),),
                                           config=lm15.Config(temperature=0.5, top_p=0.0)))


# --- real generations -----------------------------------------------------------------------------
def test_usage_is_the_engines_token_count() -> None:
    model = lm(max_tokens=8)
    with dspy.context(lm=model, adapter=velollm.Adapter(), track_usage=True):
        prediction = dspy.Predict("question -> answer")(question="What is the capital of Italy?")
    usage = prediction.get_lm_usage()[model.model]
    assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]
    # the prompt count is the model's own tokenizer's count of the rendered chat prompt
    sent = model.history[-1]["messages"]
    with velollm.pool.get_pool().engine(QWEN, n_ctx=N_CTX, n_threads=N_THREADS) as engine:
        expected = len(engine.prompt_tokens(velollm.GenerationRequest.of(messages=sent)))
    assert usage["prompt_tokens"] == expected


def test_generation_options_reach_the_engine() -> None:
    model = lm(max_tokens=64)
    out = model("Write the numbers from 1 to 9, separated by commas, nothing else.", stop=["5"])[0]
    assert "5" not in out and "4" in out
    short = model("Write a long story about a dragon.", max_tokens=3)
    assert model.history[-1]["usage"]["completion_tokens"] == 3 and short[0]
    assert model.history[-1]["response"].finish_reason == "length"


def test_n_returns_n_completions() -> None:
    model = lm(max_tokens=12)
    with dspy.context(lm=model, adapter=velollm.Adapter()):
        prediction = dspy.Predict("question -> answer: int", n=3)(question="Pick a number from 1 to 9.")
    answers = prediction.completions.answer
    assert len(answers) == 3 and all(isinstance(a, int) for a in answers)
    entry = model.history[-1]
    assert len(entry["outputs"]) == 3 and entry["kwargs"]["n"] == 3
    assert entry["kwargs"]["temperature"] == 0.7  # dspy.Predict samples when n > 1
    assert entry["usage"]["completion_tokens"] >= 3 * 5  # three generations of at least `{"answer":N}`


def test_cache_hit_skips_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True, disk_cache_dir=None))
    model = lm(max_tokens=6, cache=True)
    prompt = f"Repeat this code exactly: {uuid.uuid4().hex[:8]}"
    first = model(prompt)
    assert model.history[-1]["usage"]["completion_tokens"] > 0
    second = model(prompt)
    assert second == first
    assert model.history[-1]["usage"] == {}  # a cache hit bills nothing: no generation ran


def test_acall_and_async_predict() -> None:
    # 16, not 8: a constrained answer keeps a closing reserve (the smallest answer plus slack, 11 tokens
    # here), and from a budget under it the answer is steered closed from its first token (issue 15)
    model = lm(max_tokens=16)

    async def run() -> tuple[list[str], dspy.Prediction]:
        text = await model.acall("Answer with one word: what color is the sky on a clear day?")
        with dspy.context(lm=model, adapter=velollm.Adapter()):
            prediction = await dspy.Predict("question -> answer: int").acall(question="What is 2 + 2?")
        return text, prediction

    text, prediction = asyncio.run(run())
    assert "blue" in text[0].lower()
    assert prediction.answer == 4


def test_engine_stream_events_carry_text_and_usage() -> None:
    model = lm()
    request = lm15.Request(model=model.model, messages=(lm15.Message.user("Say hello."),),
                           config=lm15.Config(max_tokens=5, temperature=0.0))
    events = list(model.engine.stream(request))
    assert events[0].type == "start" and events[-1].type == "end"
    text = "".join(e.delta.text for e in events if e.type == "delta")
    assert text and events[-1].usage.output_tokens >= 1
    assert model(request).text == text  # explicit Request calls return a Response with the same greedy text


def test_missing_model_file_is_a_typed_error_not_retried(tmp_path) -> None:
    model = velollm.LM(str(tmp_path / "absent.gguf"), cache=False)
    with pytest.raises(LMUnsupportedModelError) as info:
        model("hello")
    assert isinstance(velollm_cause(info.value), ModelNotFound)


def test_context_overflow_is_context_window_exceeded() -> None:
    model = lm(max_tokens=4)
    with pytest.raises(ContextWindowExceededError):
        model("word " * (N_CTX + 100))


def test_lm_state_round_trip_keeps_model_and_load_options() -> None:
    from dspy.clients.base_lm import BaseLM

    model = velollm.LM(QWEN, max_tokens=33, n_ctx=N_CTX)
    loaded = BaseLM.load_state(model.dump_state(), allow_custom_lm_class=True)
    assert isinstance(loaded, velollm.LM) and loaded.model == model.model
    assert loaded.kwargs["max_tokens"] == 33 and loaded.engine.load_options == {"n_ctx": N_CTX}


def test_structured_outputs_decide_the_adapters_plan() -> None:
    signature = dspy.Predict("question -> answer: int").signature
    fmt, response_format = velollm.Adapter().plan(lm(), {}, signature)
    assert fmt == "json" and response_format["json_schema"]["schema"]["properties"]["answer"] == {"type": "integer"}
    plain = lm(structured_outputs=False)
    assert not plain.supports_response_schema and "response_format" not in plain.supported_params
    assert velollm.Adapter().plan(plain, {}, signature) == ("markers", None)
    assert velollm.Adapter(unconstrained_format="json").plan(plain, {}, signature) == ("json", None)


def test_the_fixed_json_layout_goes_to_velollm_engines_only() -> None:
    """llguidance's layout options ride in the schema for velollm.LM; any other LM gets plain JSON Schema,
    and the remote backend strips them before a request leaves the process."""
    from velollm.adapters.dspy.schema import FIXED_LAYOUT

    signature = dspy.Predict("question -> answer: int").signature
    _, ours = velollm.Adapter().plan(lm(), {}, signature)
    assert ours["json_schema"]["schema"]["x-guidance"] == FIXED_LAYOUT

    class OtherProvider:  # what DSPy's own LM says for a provider with structured outputs
        supports_response_schema = True

    _, theirs = velollm.Adapter().plan(OtherProvider(), {}, signature)
    assert theirs is not None and "x-guidance" not in theirs["json_schema"]["schema"]


def test_velollm_adapter_answers_in_the_fixed_layout() -> None:
    """``{"answer": 5}``: json.dumps's separators and no other whitespace (the batch inserts what is forced)."""
    import json

    model = lm(cache=False)
    with dspy.context(lm=model, adapter=velollm.Adapter()):
        prediction = dspy.Predict("question -> answer: int")(question="What is 2 + 3?")
    raw = model.history[-1]["outputs"][0]
    assert isinstance(prediction.answer, int)
    assert raw == json.dumps(json.loads(raw)), raw
