"""``velollm serve`` as a subprocess on a free loopback port, called with the official openai client.

One server (Qwen 0.5B as ``qwen`` and Gemma 270M, API key required) serves the whole module;
the last test shuts it down and checks the shutdown was clean. ``response_format`` json_schema
through the server is tested in ``test_remote_backend.py`` (the remote backend sends it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_process import Server, start_server

KEY = "test-key-123"
QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma3-270m"
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(qwen_path: Any, gemma_path: Any) -> Iterator[Server]:
    srv = start_server("-m", f"qwen={QWEN}", "-m", GEMMA, "--api-key", KEY, "--ctx", "2048")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)


def _post(server: Server, path: str, body: Any = None, *, raw: bytes | None = None, key: str | None = KEY,
          ) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.root + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=300)
    return httpx.post(server.root + path, json=body, headers=headers, timeout=300)


def _pool_model(server: Server, ref: str) -> dict[str, Any] | None:
    status = httpx.get(server.base_url + "/pool", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    return next((m for m in status["models"] if m["ref"] == ref), None)


# --- auth, listing ----------------------------------------------------------------------------------
def test_health_is_open_and_everything_else_needs_the_key(server: Server) -> None:
    assert httpx.get(server.root + "/health", timeout=30).json()["status"] == "ok"
    denied = httpx.get(server.base_url + "/models", timeout=30)
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="qwen", messages=COUNT, max_tokens=2)


def test_models_lists_the_served_ids(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["qwen", GEMMA]


# --- chat -------------------------------------------------------------------------------------------
def test_chat_completion_with_the_openai_client(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="qwen", messages=COUNT, max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.startswith("1, 2")
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert response.model == "qwen"


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="qwen", messages=COUNT, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="qwen", messages=COUNT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_seed_and_n(client: openai.OpenAI) -> None:
    stopped = client.chat.completions.create(model="qwen", messages=COUNT, max_tokens=30, temperature=0, stop=["5"])
    assert stopped.choices[0].message.content.startswith("1, 2, 3, 4")
    assert "5" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    hello = [{"role": "user", "content": "Name a fruit."}]
    a = client.chat.completions.create(model="qwen", messages=hello, max_tokens=3, temperature=1.0, seed=7, n=2)
    b = client.chat.completions.create(model="qwen", messages=hello, max_tokens=3, temperature=1.0, seed=7, n=2)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: repeatable
    assert a.usage.prompt_tokens == b.usage.prompt_tokens and a.usage.completion_tokens <= 6


# --- legacy completions, tokenization, two models at once -------------------------------------------------
def test_completions_endpoint_sync_and_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=GEMMA, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens <= 5
    parts = list(client.completions.create(model=GEMMA, prompt="The capital of France is", max_tokens=5,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_tokenize_and_detokenize_round_trip(server: Server) -> None:
    tokens = _post(server, "/tokenize", {"model": "qwen", "prompt": "hello world", "add_special_tokens": False})
    assert tokens.status_code == 200
    body = tokens.json()
    assert body["count"] == len(body["tokens"]) == 2 and body["max_model_len"] == 2048
    text = _post(server, "/detokenize", {"model": "qwen", "tokens": body["tokens"]}).json()
    assert text["prompt"] == "hello world"


def test_unknown_token_ids_are_a_bad_request_not_a_crash(server: Server) -> None:
    for tokens in ([10**9], [-1], ["a"]):
        response = _post(server, "/detokenize", {"model": "qwen", "tokens": tokens})
        assert response.status_code == 400, response.text
    assert _post(server, "/detokenize", {"model": "qwen", "tokens": [14990]}).json()["prompt"] == "hello"


def test_different_models_run_at_the_same_time(server: Server, client: openai.OpenAI) -> None:
    results: dict[str, str] = {}

    def ask(model: str) -> None:
        r = client.chat.completions.create(model=model, messages=COUNT, max_tokens=6, temperature=0)
        results[model] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("qwen", GEMMA)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(results) == {"qwen", GEMMA} and all(results.values())
    status = httpx.get(server.base_url + "/pool", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert {m["ref"] for m in status["models"] if m["state"] == "ready"} >= {QWEN, GEMMA}
    assert set(status["served"]) == {"qwen", GEMMA}


# --- bad requests leave the server healthy ------------------------------------------------------------------
@pytest.mark.parametrize(("body", "raw", "status", "code"), [
    (None, b"{not json", 400, "invalid_json"),
    ({"model": "nope", "messages": COUNT}, None, 404, "model_not_found"),
    ({"model": "qwen", "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4}, None, 400,
     "context_length_exceeded"),
    ({"model": "qwen", "messages": COUNT, "max_tokens": 10**9}, None, 400, None),
    ({"model": "qwen", "messages": COUNT, "max_tokens": -3}, None, 400, None),
    ({"model": "qwen", "messages": COUNT, "functions": [{"name": "f"}]}, None, 400, "unsupported_parameter"),
    ({"model": "qwen", "messages": COUNT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None, 400, None),
    ({"model": "qwen", "messages": COUNT, "frobnicate": 1}, None, 400, None),
    ({"model": "qwen", "messages": []}, None, 400, None),
    ({"model": "qwen", "messages": COUNT, "n": 1000}, None, 400, None),
])
def test_bad_requests_get_openai_error_bodies(server: Server, body: Any, raw: bytes | None, status: int,
                                              code: str | None) -> None:
    response = _post(server, "/v1/chat/completions", body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == code


def test_server_is_healthy_after_bad_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=COUNT, max_tokens=2)
    response = client.chat.completions.create(model="qwen", messages=COUNT, max_tokens=4, temperature=0)
    assert response.choices[0].message.content.startswith("1, 2")


# client disconnects stopping generation: tests/test_server_cancellation.py (observed on the engine)


def test_clean_shutdown(server: Server) -> None:
    code, output = server.stop()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
