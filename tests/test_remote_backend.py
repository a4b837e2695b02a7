"""The ``remote`` backend against a real ``velollm serve`` subprocess (Qwen 0.5B), plus its retry
logic against scripted HTTP answers (httpx's MockTransport: no sockets, no model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import Server, free_port, start_server

from velollm.engine import GenerationRequest, LoadOptions
from velollm.errors import (
    AuthenticationFailed,
    ContextOverflow,
    InvalidRequest,
    ModelNotFound,
    RemoteUnavailable,
    UnsupportedFeature,
)
from velollm.plugins.remote import RemoteBackend, RemoteEngine, RemoteSource, RemoteSpec, parse_ref
from velollm.pool import ModelPool

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

KEY = "remote-test-key"
QWEN = "qwen2.5-coder-0.5b-instruct"
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


# --- references and config (no server) ----------------------------------------------------------------
def test_parse_url_and_named_references(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_ref("remote:http://127.0.0.1:8000/v1#qwen")
    assert (spec.base_url, spec.model, spec.root_url) == ("http://127.0.0.1:8000/v1", "qwen", "http://127.0.0.1:8000")
    assert parse_ref("remote:http://127.0.0.1:8000/v1").model is None
    config = tmp_path / "remotes.json"
    config.write_text(json.dumps({"lab": {"base_url": "http://127.0.0.1:9000/v1", "retries": 1,
                                          "models": {"small": "Qwen/Qwen2.5-0.5B"}}}))
    monkeypatch.setenv("VELOLLM_REMOTES", str(config))
    named = parse_ref("remote:lab#small")
    assert (named.base_url, named.model, named.retries) == ("http://127.0.0.1:9000/v1", "Qwen/Qwen2.5-0.5B", 1)
    assert parse_ref("remote:lab#other").model == "other"  # unmapped names pass through
    for bad in ("remote:", "remote:nowhere#x", "remote:ftp://host/v1#x", "remote:http://#x"):
        with pytest.raises(ModelNotFound):
            parse_ref(bad)


def test_source_writes_a_spec_without_secrets(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path))
    monkeypatch.setenv("VELOLLM_REMOTE_API_KEY", "sk-secret")
    resolved = RemoteSource().resolve("remote:http://127.0.0.1:8000/v1#qwen")
    assert resolved.backend == "remote" and resolved.name == "qwen"
    text = resolved.path.read_text()
    assert "sk-secret" not in text and json.loads(text)["ref"] == "remote:http://127.0.0.1:8000/v1#qwen"
    assert RemoteSource().handles("remote:x") and not RemoteSource().handles("qwen0.5b")


# --- retries and error mapping (scripted answers) --------------------------------------------------------
def _scripted(answers: list[tuple[int, Any]], calls: list[httpx.Request]) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status, body = answers[min(len(calls), len(answers)) - 1]
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body)

    return httpx.Client(transport=httpx.MockTransport(handle), base_url="http://127.0.0.1:1/v1/")


_OK = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
_REQ = GenerationRequest.of(messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0)


def _engine(answers: list[tuple[int, Any]], calls: list[httpx.Request], retries: int = 2) -> RemoteEngine:
    spec = RemoteSpec(base_url="http://127.0.0.1:1/v1", model="m", retries=retries)
    return RemoteEngine(spec, client=_scripted(answers, calls), connect=False)


def test_transient_failures_are_retried() -> None:
    calls: list[httpx.Request] = []
    engine = _engine([(503, {"error": {"message": "busy"}}), (200, _OK)], calls)
    completion = engine.generate(_REQ)
    assert completion.text == "hi" and completion.usage.prompt_tokens == 3 and len(calls) == 2
    body = json.loads(calls[-1].content)
    assert body["model"] == "m" and body["max_tokens"] == 4 and body["messages"][0]["content"] == "x"


def test_retries_give_up_with_a_typed_error() -> None:
    calls: list[httpx.Request] = []
    engine = _engine([(0, httpx.ConnectError("refused"))], calls, retries=2)
    with pytest.raises(RemoteUnavailable, match="cannot be reached"):
        engine.generate(_REQ)
    assert len(calls) == 3


@pytest.mark.parametrize(("status", "body", "error"), [
    (400, {"error": {"message": "bad temperature"}}, InvalidRequest),
    (400, {"error": {"message": "too long", "code": "context_length_exceeded"}}, ContextOverflow),
    (401, {"error": {"message": "no key"}}, AuthenticationFailed),
    (404, {"error": {"message": "no such model", "code": "model_not_found"}}, ModelNotFound),
])
def test_client_errors_are_not_retried(status: int, body: Any, error: type[Exception]) -> None:
    calls: list[httpx.Request] = []
    with pytest.raises(error):
        _engine([(status, body)], calls).generate(_REQ)
    assert len(calls) == 1


def test_grammar_needs_a_remote_that_says_it_supports_it() -> None:
    engine = _engine([(200, _OK)], [])
    with pytest.raises(UnsupportedFeature):
        engine.stream(GenerationRequest.of(prompt="x", grammar='root ::= "a"'))


# --- against a real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(qwen_path: Any) -> Iterator[Server]:
    srv = start_server("-m", f"qwen={QWEN}", "--api-key", KEY, "--ctx", "2048", "--preload")
    yield srv
    srv.stop()


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_REMOTE_API_KEY", KEY)


@pytest.fixture(scope="module")
def pool() -> Iterator[ModelPool]:
    pool = ModelPool()
    yield pool
    pool.close()


@pytest.mark.slow
def test_generate_stream_and_tokenize_through_the_pool(server: Server, keyed: None, pool: ModelPool) -> None:
    ref = f"remote:{server.base_url}#qwen"
    with pool.engine(ref) as engine:
        assert engine.context_length == 2048  # learned from the server's /v1/models
        request = GenerationRequest.of(messages=COUNT, max_tokens=8, temperature=0)
        whole = engine.generate(request)
        assert whole.text.startswith("1, 2") and whole.finish_reason == "length"
        assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 10
        chunks = list(engine.stream(request))
        assert "".join(c.text for c in chunks) == whole.text
        # the server's prefix cache may serve the repeated prompt: the same usage but for cached_tokens
        usage = chunks[-1].usage
        assert chunks[-1].finish_reason == "length" and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, 8)
        assert 0 <= usage.cached_tokens < usage.prompt_tokens
        tokens = engine.tokenize("hello world", add_special=False)
        assert len(tokens) == 2 and engine.detokenize(tokens) == "hello world"
        with pytest.raises(ContextOverflow):
            engine.generate(GenerationRequest.of(messages=[{"role": "user", "content": "word " * 3000}],
                                                 max_tokens=4))
    assert any(m.ref == ref and m.backend == "remote" for m in pool.status().models)


@pytest.mark.slow
def test_json_schema_is_forwarded(server: Server, keyed: None, pool: ModelPool) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    with pool.engine(f"remote:{server.base_url}#qwen") as engine:
        completion = engine.generate(GenerationRequest.of(
            messages=[{"role": "user", "content": "Name the capital of Italy as JSON."}], max_tokens=16,
            temperature=0, json_schema=schema))
    jsonschema.validate(json.loads(completion.text), schema)
    # velollm.Adapter's llguidance layout options are velollm's, not JSON Schema: they never leave
    with pool.engine(f"remote:{server.base_url}#qwen") as engine:
        request = GenerationRequest.of(prompt="x", json_schema={**schema, "x-guidance": {"whitespace_flexible": False}})
        _, body = engine.raw._body_for(request, stream=False)  # the body the remote would receive
    assert "x-guidance" not in json.dumps(body) and body["response_format"]["json_schema"]["schema"] == schema


@pytest.mark.slow
def test_connection_errors(server: Server, keyed: None, monkeypatch: pytest.MonkeyPatch, pool: ModelPool) -> None:
    with pytest.raises(ModelNotFound, match="does not serve 'nope'"):
        pool.acquire(f"remote:{server.base_url}#nope")
    monkeypatch.setenv("VELOLLM_REMOTE_API_KEY", "wrong")
    with pytest.raises(AuthenticationFailed):
        pool.acquire(f"remote:{server.base_url}#qwen", extra={"retries": 0})
    with pytest.raises(RemoteUnavailable):
        pool.acquire(f"remote:http://127.0.0.1:{free_port()}/v1#qwen", extra={"retries": 1})
    with pytest.raises(Exception, match="unknown remote options"):
        RemoteBackend().load(RemoteSource().resolve(f"remote:{server.base_url}#qwen").path,
                             LoadOptions(extra={"speed": "fast"}))


@pytest.mark.slow
def test_named_entry_with_model_mapping(server: Server, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                        pool: ModelPool) -> None:
    config = tmp_path / "remotes.json"
    config.write_text(json.dumps({"local": {"base_url": server.base_url, "api_key_env": "LOCAL_KEY",
                                            "models": {"small": "qwen"}}}))
    monkeypatch.setenv("VELOLLM_REMOTES", str(config))
    monkeypatch.setenv("LOCAL_KEY", KEY)
    with pool.engine("remote:local#small") as engine:
        assert engine.name == "qwen"
        assert engine.generate(GenerationRequest.of(messages=COUNT, max_tokens=4, temperature=0)).text.startswith("1")


@pytest.mark.slow
def test_litellm_and_dspy_use_a_remote_reference_unchanged(server: Server, keyed: None) -> None:
    import dspy
    import litellm

    import velollm

    velollm.register_litellm()
    model = f"velollm/remote:{server.base_url}#qwen"
    response = litellm.completion(model=model, messages=COUNT, max_tokens=6, temperature=0)
    assert response.choices[0].message.content.startswith("1, 2") and response.usage.completion_tokens == 6

    class CapitalQA(dspy.Signature):
        """Answer with the name of the city only."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    with dspy.context(lm=dspy.LM(model, temperature=0, max_tokens=64, cache=False), adapter=dspy.ChatAdapter()):
        prediction = dspy.Predict(CapitalQA)(question="What is the capital of France?")
    assert "paris" in prediction.answer.lower()
