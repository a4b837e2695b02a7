"""The litellm provider on the real Qwen 0.5B model: ``litellm.completion(model="velollm/...")``.

One engine (the process-wide pool's) serves the whole module; generations are greedy and short.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch when litellm is imported here

import litellm  # noqa: E402

import velollm  # noqa: E402
from velollm.engine import GenerationRequest  # noqa: E402
from velollm.pool import get_pool  # noqa: E402

QWEN = "qwen2.5-coder-0.5b-instruct"
MODEL = f"velollm/{QWEN}"
HELLO = [{"role": "user", "content": "Say hello in one word."}]
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def provider(qwen_path: Any) -> Iterator[Any]:
    handler = velollm.register_litellm()
    yield handler
    velollm.register_litellm()


def _text(response: Any) -> str:
    return response.choices[0].message.content


# --- registration ---------------------------------------------------------------------------------
def test_register_is_idempotent() -> None:
    first = velollm.register_litellm()
    second = velollm.register_litellm()
    assert first is second
    entries = [e for e in litellm.custom_provider_map if e["provider"] == "velollm"]
    assert len(entries) == 1 and entries[0]["custom_handler"] is first
    assert "velollm" in litellm.provider_list


def test_importing_velollm_registers_when_litellm_is_imported_later() -> None:
    # DSPy finds litellm's spec first and imports it later: the hook must survive that order.
    code = (
        "import sys, importlib.util, velollm\n"
        "assert 'litellm' not in sys.modules\n"
        "importlib.util.find_spec('litellm')\n"
        "import litellm\n"
        "print(sum(e['provider'] == 'velollm' for e in litellm.custom_provider_map))\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("VELOLLM_LITELLM_AUTOREGISTER", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_auto_registration_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from velollm.adapters.litellm import autoregister as litellm_autoregister

    monkeypatch.setitem(sys.modules, "litellm", None)  # as if litellm were not imported yet
    monkeypatch.setenv("VELOLLM_LITELLM_AUTOREGISTER", "0")
    litellm_autoregister.install()
    assert litellm_autoregister._hook not in sys.meta_path
    monkeypatch.setenv("VELOLLM_LITELLM_AUTOREGISTER", "1")
    monkeypatch.delitem(sys.modules, "litellm")
    try:
        litellm_autoregister.install()
        assert litellm_autoregister._hook in sys.meta_path
    finally:
        litellm_autoregister._uninstall()


# --- completions ----------------------------------------------------------------------------------
def test_sync_completion_reports_real_usage() -> None:
    response = litellm.completion(model=MODEL, messages=COUNT, max_tokens=6, temperature=0)
    assert _text(response).startswith("1, 2")
    assert response.choices[0].finish_reason == "length"
    with get_pool().engine(QWEN) as engine:
        prompt = engine.prompt_tokens(GenerationRequest.of(messages=COUNT))
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == len(prompt) + 6


def test_stop_sequence_ends_generation_before_it() -> None:
    response = litellm.completion(model=MODEL, messages=COUNT, max_tokens=40, temperature=0, stop=["5"])
    text = _text(response)
    assert text.startswith("1, 2, 3, 4") and "5" not in text
    assert response.choices[0].finish_reason == "stop"


def test_n_gives_several_choices_and_counts_the_prompt_once() -> None:
    response = litellm.completion(model=MODEL, messages=HELLO, max_tokens=3, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content for c in response.choices)
    with get_pool().engine(QWEN) as engine:
        prompt = engine.prompt_tokens(GenerationRequest.of(messages=HELLO))
    assert response.usage.prompt_tokens == len(prompt)
    assert 2 <= response.usage.completion_tokens <= 6  # both choices counted, each at most max_tokens


def test_sync_stream_matches_completion_and_ends_with_usage() -> None:
    whole = litellm.completion(model=MODEL, messages=COUNT, max_tokens=8, temperature=0)
    chunks = list(litellm.completion(model=MODEL, messages=COUNT, max_tokens=8, temperature=0, stream=True,
                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _text(whole)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens == 8 and usage[-1].prompt_tokens == whole.usage.prompt_tokens


def test_async_completion_and_async_stream() -> None:
    async def run() -> tuple[Any, str, list[str]]:
        response = await litellm.acompletion(model=MODEL, messages=COUNT, max_tokens=8, temperature=0)
        stream = await litellm.acompletion(model=MODEL, messages=COUNT, max_tokens=8, temperature=0, stream=True)
        pieces, reasons = [], []
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
        return response, "".join(pieces), reasons

    response, streamed, reasons = asyncio.run(run())
    assert _text(response).startswith("1, 2") and response.usage.completion_tokens == 8
    assert streamed == _text(response)
    assert reasons == ["length"]


def test_json_schema_output_validates() -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response = litellm.completion(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}], max_tokens=30,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    data = json.loads(_text(response))
    jsonschema.validate(data, schema)


# --- errors ---------------------------------------------------------------------------------------
def test_unknown_model_is_not_found_sync_async_and_streaming() -> None:
    with pytest.raises(litellm.NotFoundError, match="no-such-model"):
        litellm.completion(model="velollm/no-such-model", messages=HELLO, num_retries=0)

    async def run() -> None:
        with pytest.raises(litellm.NotFoundError):
            await litellm.acompletion(model="velollm/no-such-model", messages=HELLO, num_retries=0)
        with pytest.raises(litellm.NotFoundError):
            stream = await litellm.acompletion(model="velollm/no-such-model", messages=HELLO, stream=True)
            async for _ in stream:
                pass

    asyncio.run(run())


def test_bad_and_unsupported_parameters_are_bad_requests() -> None:
    with pytest.raises(litellm.BadRequestError, match="logit bias"):
        litellm.completion(model=MODEL, messages=HELLO, logit_bias={"1": 5}, num_retries=0)
    with pytest.raises(litellm.BadRequestError, match="max_tokens"):
        litellm.completion(model=MODEL, messages=HELLO, max_tokens=10**7, num_retries=0)
    with pytest.raises(litellm.BadRequestError, match="response_format"):
        litellm.completion(model=MODEL, messages=HELLO, response_format={"type": "xml"}, num_retries=0)
    with pytest.raises(litellm.BadRequestError, match="n > 1"):
        litellm.completion(model=MODEL, messages=HELLO, n=2, stream=True, num_retries=0)


def test_over_long_prompt_is_a_context_window_error() -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=MODEL, messages=long, max_tokens=4, num_retries=0)


# --- concurrency and cancellation -------------------------------------------------------------------
WORDS = ["apple", "banana", "cherry", "dolphin", "elephant", "falcon", "giraffe", "harbor"]


def test_eight_concurrent_acompletions_are_whole_and_not_interleaved() -> None:
    async def one(word: str) -> str:
        response = await litellm.acompletion(
            model=MODEL, messages=[{"role": "user", "content": f"Repeat this word exactly, nothing else: {word}"}],
            max_tokens=6, temperature=0)
        return _text(response)

    async def run() -> list[str]:
        return await asyncio.gather(*(one(w) for w in WORDS))

    outputs = asyncio.run(run())
    for word, text in zip(WORDS, outputs, strict=True):
        assert word in text.lower(), (word, text)
        assert not any(other in text.lower() for other in WORDS if other != word), (word, text)


class _CountingPool:
    """The real pool, watching how many chunks each stream yields and when it closes."""

    def __init__(self) -> None:
        self.inner = get_pool()
        self.chunks = 0
        self.closed = threading.Event()

    def acquire(self, ref: str, **options: Any) -> Any:
        lease = self.inner.acquire(ref, **options)
        pool = self
        real_stream = lease.engine.stream

        def stream(request: GenerationRequest) -> Iterator[Any]:
            inner = real_stream(request)

            def counted() -> Iterator[Any]:
                try:
                    for chunk in inner:
                        pool.chunks += 1
                        yield chunk
                finally:
                    inner.close()
                    pool.closed.set()

            return counted()

        lease.engine.stream = stream  # type: ignore[method-assign]
        return lease


def test_cancelled_acompletion_stops_generation_and_frees_the_engine() -> None:
    spy = _CountingPool()
    velollm.register_litellm(pool=spy)
    # no end: only max_tokens (or cancellation) stops it; two branches, since llguidance's Earley items grow
    # without bound on the one-literal 'root ::= "la " root' (ParserTooComplex after a few hundred tokens)
    endless = 'root ::= ("la " | "lo ") root'

    async def run() -> str:
        task = asyncio.create_task(litellm.acompletion(model=MODEL, messages=HELLO, max_tokens=1000, temperature=0,
                                                       grammar=endless))
        while spy.chunks < 3 and not task.done():  # it is generating
            await asyncio.sleep(0.05)
        assert not task.done(), f"the request ended before it could be cancelled: {task.exception()!r}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(spy.closed.wait, 60), "the generation never stopped"
        after = await litellm.acompletion(model=MODEL, messages=COUNT, max_tokens=6, temperature=0)
        return _text(after)

    try:
        text = asyncio.run(run())
    finally:
        velollm.register_litellm()
    assert spy.chunks < 50, f"cancellation did not stop generation ({spy.chunks} of 1000 chunks)"
    assert text.startswith("1, 2")  # the engine's state is intact: same greedy answer as before


# --- DSPy through litellm -------------------------------------------------------------------------
def test_dspy_program_with_chat_adapter_via_litellm() -> None:
    import dspy

    class CapitalQA(dspy.Signature):
        """Answer with the name of the city only."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    lm = dspy.LM(MODEL, temperature=0, max_tokens=64, cache=False)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(), track_usage=True):
        prediction = dspy.Predict(CapitalQA)(question="What is the capital of France?")
    assert "paris" in prediction.answer.lower()
    usage = prediction.get_lm_usage()[MODEL]
    assert usage["prompt_tokens"] > 50 and usage["completion_tokens"] > 0


def test_dspy_streamify_streams_the_answer_field() -> None:
    import dspy

    class Sum(dspy.Signature):
        """Answer with the number only."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    lm = dspy.LM(MODEL, temperature=0, max_tokens=64, cache=False)
    program = dspy.streamify(dspy.Predict(Sum),
                             stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])

    async def run() -> tuple[list[Any], Any]:
        pieces, final = [], None
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
            async for item in program(question="What is 2 + 2?"):
                if isinstance(item, dspy.streaming.StreamResponse):
                    pieces.append(item)
                elif isinstance(item, dspy.Prediction):
                    final = item
        return pieces, final

    pieces, final = asyncio.run(run())
    assert final is not None and "4" in final.answer
    assert pieces and all(p.signature_field_name == "answer" for p in pieces)
    assert "4" in "".join(p.chunk for p in pieces)
