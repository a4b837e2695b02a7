"""The shared OpenAI <-> velollm mapping (no model needed): parameters, shapes, errors, round trips."""

from __future__ import annotations

from typing import Any

import pytest

from velollm import openai_wire as oc
from velollm.engine import Completion, GenerationRequest, Usage
from velollm.errors import (
    AuthenticationFailed,
    ContextOverflow,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    RemoteUnavailable,
    UnsupportedFeature,
)

HI = [{"role": "user", "content": "hi"}]


def test_sampling_length_stop_and_seed_are_mapped() -> None:
    parsed = oc.parse_chat({"model": "m", "messages": HI, "temperature": 0.2, "top_p": 0.5, "top_k": 7, "min_p": 0.1,
                            "max_tokens": 9, "stop": "END", "seed": 3, "frequency_penalty": 0.5,
                            "presence_penalty": 0.25, "repetition_penalty": 1.1})
    r = parsed.request
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.max_tokens, r.stop, r.seed) == (0.2, 0.5, 7, 0.1, 9, ["END"], 3)
    assert (r.frequency_penalty, r.presence_penalty, r.repeat_penalty) == (0.5, 0.25, 1.1)
    assert parsed.model == "m" and parsed.n == 1 and not parsed.stream


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    parsed = oc.parse_chat({"messages": HI, "max_tokens": 50, "max_completion_tokens": 5})
    assert parsed.request.max_tokens == 5


@pytest.mark.parametrize(("response_format", "schema"), [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_object", "schema": {"type": "array"}}, {"type": "array"}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": True}},
     {"type": "integer"}),
])
def test_response_format_becomes_a_json_schema(response_format: Any, schema: Any) -> None:
    parsed = oc.parse_chat({"messages": HI, "response_format": response_format})
    assert parsed.request.json_schema == schema


def test_pydantic_response_format_class() -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    assert oc.parse_chat({"messages": HI, "response_format": City}).request.json_schema["required"] == ["name"]


@pytest.mark.parametrize("params", [
    {"tools": [{"type": "code_interpreter"}]},
    {"functions": [{"name": "f"}]},
    {"function_call": "auto"},
    {"logit_bias": {"1": 2}},
    {"messages": [{"role": "function", "content": "x", "name": "f"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
])
def test_unsupported_features_are_errors_not_silence(params: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedFeature):
        oc.parse_chat({"messages": HI, **params})


def test_off_values_of_unsupported_parameters_are_fine() -> None:
    parsed = oc.parse_chat({"messages": HI, "tools": [], "tool_choice": "auto", "logprobs": False, "user": "u",
                            "parallel_tool_calls": True})
    assert parsed.request.messages[0].content == "hi"


@pytest.mark.parametrize("params", [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": HI, "n": 0},
    {"messages": HI, "n": oc.MAX_N + 1},
    {"messages": HI, "stop": [1, 2]},
    {"messages": HI, "max_tokens": "many"},
    {"messages": HI, "max_tokens": 0},
    {"messages": HI, "temperature": -1},
    {"messages": HI, "response_format": {"type": "yaml"}},
    {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    {"messages": HI, "model": 3},
])
def test_bad_parameters_are_invalid_requests(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        oc.parse_chat(params)


def test_unknown_parameters_strict_and_lenient() -> None:
    with pytest.raises(InvalidRequest, match="frobnicate"):
        oc.parse_chat({"messages": HI, "frobnicate": 1})
    assert oc.parse_chat({"messages": HI, "frobnicate": 1, "max_retries": 0}, strict=False).request.max_tokens == 256


def test_messages_text_parts_and_developer_role() -> None:
    parsed = oc.parse_chat({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
    ]})
    first, second = parsed.request.messages
    assert (first.role, first.content) == ("system", "be brief")
    assert (second.role, second.content) == ("user", "ab")


def test_choices_get_consecutive_seeds() -> None:
    parsed = oc.parse_chat({"messages": HI, "n": 3, "seed": 10})
    assert [r.seed for r in parsed.requests()] == [10, 11, 12]
    assert [r.seed for r in oc.parse_chat({"messages": HI, "n": 2}).requests()] == [None, None]


def test_completion_prompts() -> None:
    batch = oc.parse_completion({"prompt": ["a", "b"], "n": 2, "max_tokens": 3})
    assert [p.request.prompt for p in batch] == ["a", "b"] and all(p.n == 2 for p in batch)
    assert [p.request.prompt for p in oc.parse_completion({"prompt": [[1, 2, 3], "x"]})] == [[1, 2, 3], "x"]
    assert [p.request.prompt for p in oc.parse_completion({"prompt": [5, 6]})] == [[5, 6]]  # token ids
    for bad in ([], [[]], [1, "a"], [True], [1.5], [[1], [None]], 3):
        with pytest.raises(InvalidRequest, match="'prompt' must be"):
            oc.parse_completion({"prompt": bad})
    with pytest.raises(InvalidRequest):
        oc.parse_completion({"prompt": ["a"] * 9, "n": 2})
    with pytest.raises(UnsupportedFeature):
        oc.parse_completion({"prompt": "a", "echo": True})


def _done(text: str, prompt: int, completion: int, finish: str = "stop") -> Completion:
    return Completion(text=text, finish_reason=finish, usage=Usage(prompt_tokens=prompt, completion_tokens=completion))


def test_response_shapes_and_usage() -> None:
    chat = oc.chat_completion([_done("a", 5, 2), _done("b", 5, 3, "length")], "m")
    assert chat["object"] == "chat.completion" and chat["model"] == "m"
    assert [c["message"]["content"] for c in chat["choices"]] == ["a", "b"]
    assert chat["choices"][1]["finish_reason"] == "length"
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    text = oc.text_completion([_done("x", 4, 1), _done("y", 4, 1), _done("z", 6, 1), _done("w", 6, 1)], "m",
                              prompts=2)
    assert text["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    chunk = oc.chat_chunk("id", "m", 1, 0, content="t")
    assert chunk["choices"][0]["delta"] == {"content": "t"} and chunk["object"] == "chat.completion.chunk"


@pytest.mark.parametrize(("error", "status"), [
    (ContextOverflow("long"), 400), (UnsupportedFeature("tools"), 400), (InvalidRequest("bad"), 400),
    (ModelNotFound("gone"), 404), (AuthenticationFailed("key"), 401), (QueueFull("busy"), 429),
    (RemoteUnavailable("down"), 502),
])
def test_errors_survive_the_round_trip_through_http(error: Exception, status: int) -> None:
    assert oc.error_status(error)[0] == status
    body = oc.error_body(error)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    back = oc.error_from_response(status, body)
    assert isinstance(back, type(error)) or isinstance(error, type(back)), (error, back)


def test_unexpected_errors_do_not_leak_their_message() -> None:
    body = oc.error_body(RuntimeError("/secret/path"))
    assert "/secret/path" not in body["error"]["message"] and oc.error_status(RuntimeError())[0] == 500


def test_request_survives_the_round_trip_through_the_openai_body() -> None:
    request = GenerationRequest.of(messages=HI, max_tokens=7, temperature=0.3, top_p=0.9, top_k=5, min_p=0.02,
                                   stop=["x"], seed=4, repeat_penalty=1.2, json_schema={"type": "object"})
    endpoint, body = oc.openai_body(request, "remote-name", stream=True)
    assert endpoint == "chat/completions" and body["model"] == "remote-name" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    back = oc.parse_chat(body).request
    assert back.model_dump() == request.model_dump()
    endpoint, body = oc.openai_body(GenerationRequest.of(prompt="p"), "m", sampling_extras=False)
    assert endpoint == "completions" and body["prompt"] == "p" and "top_k" not in body


def test_answers_from_a_remote_become_engine_types() -> None:
    done = oc.completion_from_openai({"model": "r", "choices": [{"message": {"content": "ok"},
                                                                 "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    assert (done.text, done.finish_reason, done.usage.completion_tokens) == ("ok", "length", 1)
    assert oc.chunk_from_openai({"choices": [{"delta": {"content": "a"}, "finish_reason": None}]}) == ("a", None, None)
    with pytest.raises(RemoteUnavailable):
        oc.chunk_from_openai({"error": {"message": "boom"}})
