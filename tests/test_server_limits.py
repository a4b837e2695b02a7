"""Bad input gets a 400 (or 413/415) from a real ``velollm serve``, never a 500 or a dead server.

One server with two models (Gemma 270M, Qwen 0.5B as ``qwen``; only Gemma is ever loaded) and an
API key serves the module. Each case here answered 500, crashed the process (SIGSEGV) or was
silently accepted before ``velollm.limits`` and the wire checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import Server, start_server

from velollm.engine import Engine, GenerationRequest
from velollm.errors import GrammarError

KEY = "limits-key"
GEMMA = "gemma3-270m"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEEP = 30_000
DEEP_GRAMMAR = "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP
#: U+A66E spans three byte tokens in Gemma's vocabulary: max_tokens 1 or 2 cut it
THREE_TOKEN_CHAR = "\ua66e"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(gemma_path: Any, qwen_path: Any) -> Iterator[Server]:
    srv = start_server("-m", GEMMA, "-m", "qwen=qwen2.5-coder-0.5b-instruct", "--api-key", KEY, "--ctx", "1024")
    yield srv
    code, output = srv.stop()
    assert "Segmentation fault" not in output and code == 0, output[-3000:]


def _post(server: Server, path: str, body: Any = None, *, raw: bytes | None = None,
          content_type: str = "application/json") -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.root + path, content=content, headers={**AUTH, "Content-Type": content_type},
                      timeout=120)


def _assert_alive(server: Server) -> None:
    assert server.process.poll() is None, server.output()[-3000:]
    done = _post(server, "/v1/completions", {"model": GEMMA, "prompt": "One, two,", "max_tokens": 2,
                                             "temperature": 0})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1, done.text


def _error(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    return str(error["message"])


def test_a_grammar_nested_30000_deep_is_refused_and_the_server_lives(server: Server) -> None:
    for path, body in [("/v1/completions", {"model": GEMMA, "prompt": "x", "grammar": DEEP_GRAMMAR}),
                       ("/v1/chat/completions", {"model": GEMMA, "messages": [{"role": "user", "content": "x"}],
                                                 "grammar": DEEP_GRAMMAR, "stream": True})]:
        assert "nests parentheses 30000 deep" in _error(_post(server, path, body))
    _assert_alive(server)


def test_the_engine_itself_refuses_a_deep_grammar(gemma_engine: Engine) -> None:
    """The check sits in the engine's grammar compile too: library callers never reach llama.cpp's parser."""
    with pytest.raises(GrammarError, match="nests parentheses 30000 deep"):
        gemma_engine.generate(GenerationRequest(prompt="x", grammar=DEEP_GRAMMAR, max_tokens=1))
    with pytest.raises(GrammarError, match="empty"):
        gemma_engine.generate(GenerationRequest(prompt="x", grammar=" ", max_tokens=1))


def test_a_json_body_nested_30000_deep_is_a_400_not_a_recursion_error(server: Server) -> None:
    raw = b'{"model": "gemma3-270m", "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    assert "nested 30001 levels deep" in _error(_post(server, "/v1/completions", raw=raw))
    assert "nested" in _error(_post(server, "/tokenize", raw=b"[" * DEEP + b"]" * DEEP))
    _assert_alive(server)


def test_a_body_over_the_size_limit_is_a_413(server: Server) -> None:
    raw = b'{"model": "gemma3-270m", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    response = _post(server, "/v1/completions", raw=raw)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large", response.text[:300]


@pytest.mark.parametrize(("path", "raw"), [
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": "a\\ud800b"}'),
    ("/v1/chat/completions", b'{"model": "gemma3-270m", "messages": [{"role": "user", "content": "a\\udfffb"}]}'),
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": "a", "grammar": "root ::= \\"\\ud800\\""}'),
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": "a", "stop": ["\\ud83d"]}'),
    ("/tokenize", b'{"model": "gemma3-270m", "prompt": "a\\ud800b"}'),
    ("/v1/embeddings", b'{"model": "gemma3-270m", "input": "a\\ud800b"}'),
    ("/v1/completions", b'{"model": "gemma3\\ud800", "prompt": "a"}'),
])
def test_lone_surrogates_anywhere_are_a_400(server: Server, path: str, raw: bytes) -> None:
    assert "lone surrogate" in _error(_post(server, path, raw=raw))


@pytest.mark.parametrize("model", [b"true", b"-1", b"1.5", b"NaN", b"[null]", b'{"a": 1}'])
@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenize_with_a_model_that_is_not_a_string_is_a_400(server: Server, path: str, model: bytes) -> None:
    raw = b'{"model": ' + model + b', "prompt": "hi", "tokens": [1, 2]}'
    assert "'model' must be a string" in _error(_post(server, path, raw=raw))


@pytest.mark.parametrize(("extra", "message"), [
    ({"seed": 2**64}, "'seed' must be an integer from 0 to 4294967295"),
    ({"response_format": {"type": "json_object", "schema": 123}}, "'response_format.schema' must be"),
    ({"grammar": ""}, "the grammar is empty"),
    ({"stream_options": {"include_usage": True}}, "'stream_options' is only allowed with 'stream': true"),
])
def test_invalid_fields_that_were_silently_accepted(server: Server, extra: dict[str, Any], message: str) -> None:
    assert message in _error(_post(server, "/v1/completions", {"model": GEMMA, "prompt": "x", **extra}))


def test_a_form_encoded_body_is_a_415(server: Server) -> None:
    response = _post(server, "/v1/completions", raw=b"model=gemma3-270m&prompt=hi",
                     content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_a_request_without_model_is_a_400_when_several_models_are_served(server: Server) -> None:
    for path, body in [("/v1/completions", {"prompt": "x", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/tokenize", {"prompt": "x"})]:
        assert "'model' is required (served: gemma3-270m, qwen)" in _error(_post(server, path, body))


def test_openapi_schema_needs_the_key(server: Server) -> None:
    assert httpx.get(server.root + "/openapi.json", timeout=30).status_code == 401
    schema = httpx.get(server.root + "/openapi.json", headers=AUTH, timeout=30)
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_max_tokens_inside_a_multi_token_character_drops_the_tail(server: Server, max_tokens: int) -> None:
    grammar = f'root ::= "{THREE_TOKEN_CHAR}{THREE_TOKEN_CHAR}"'
    body = {"model": GEMMA, "prompt": "x", "grammar": grammar, "max_tokens": max_tokens, "temperature": 0}
    done = _post(server, "/v1/completions", body).json()
    assert done["choices"][0]["text"] == "" and done["usage"]["completion_tokens"] == max_tokens, done
    with httpx.stream("POST", server.root + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert text == "", events
    whole = _post(server, "/v1/completions", {**body, "max_tokens": 4}).json()["choices"][0]["text"]
    assert whole == THREE_TOKEN_CHAR  # 3 tokens spell it; the 4th is the first byte of the next: dropped


def test_completions_take_the_prompt_as_token_ids(server: Server) -> None:
    text = "The capital of France is"
    ids = _post(server, "/tokenize", {"model": GEMMA, "prompt": text}).json()["tokens"]
    body = {"model": GEMMA, "max_tokens": 5, "temperature": 0}
    by_text = _post(server, "/v1/completions", {**body, "prompt": text}).json()
    by_ids = _post(server, "/v1/completions", {**body, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] and by_ids["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == by_text["usage"]["prompt_tokens"]
    both = _post(server, "/v1/completions", {**body, "prompt": [ids, ids[:3]]}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == by_text["choices"][0]["text"]


@pytest.mark.parametrize("prompt", [[2, 262144], [[5, 6], [-1]], [10**12]])
def test_token_ids_outside_the_vocabulary_are_a_400_naming_them(server: Server, prompt: list[Any]) -> None:
    message = _error(_post(server, "/v1/completions", {"model": GEMMA, "prompt": prompt, "max_tokens": 1}))
    assert "outside the vocabulary (0..262143)" in message
    assert str(prompt[-1][-1] if isinstance(prompt[-1], list) else prompt[-1]) in message
    _assert_alive(server)
