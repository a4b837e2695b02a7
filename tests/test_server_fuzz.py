"""Every route, generated bodies: never a 5xx, never a dropped connection, the server alive after.

The auth test walks the app's own route table, so a new route without the key check fails it. The
fuzz test (hypothesis, a bounded number of examples; ``FUZZ_EXAMPLES`` raises it) sends bodies
built from the API's field names with values of every JSON type, deep nesting, lone surrogates and
non-JSON bytes to a real ``velollm serve`` (Gemma 270M) over one keep-alive connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import Server, start_server
from starlette.routing import Route

from velollm.server.app import ServerConfig, create_app

KEY = "fuzz-key"
GEMMA = "gemma3-270m"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN_ROUTES = {("GET", "/health")}  # documented: everything else needs the key
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "80"))


def _routes() -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves, path parameters filled in."""
    app = create_app(ServerConfig(models={GEMMA: GEMMA}, api_key=KEY), pool=object())
    found = []
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        path = route.path.replace("{model_id:path}", GEMMA)
        assert "{" not in path, f"fill in the path parameter of {route.path}"
        found.extend((method, path) for method in sorted(route.methods or ()) if method != "HEAD")
    return found


ROUTES = _routes()


def test_the_route_table_is_what_the_tests_cover() -> None:
    paths = {p for _, p in ROUTES}
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/openapi.json",
            "/v1/models", "/health"} <= paths, paths


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_the_key(method: str, path: str) -> None:
    from starlette.testclient import TestClient

    app = create_app(ServerConfig(models={GEMMA: GEMMA}, api_key=KEY), pool=object())
    with TestClient(app, raise_server_exceptions=False) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = client.request(method, path, headers=headers, json={"model": GEMMA})
            if (method, path) in OPEN_ROUTES:
                assert response.status_code == 200
            else:
                assert response.status_code == 401, (method, path, headers, response.status_code, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"


# --- fuzz --------------------------------------------------------------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "n", "stop", "stream", "stream_options", "response_format", "grammar", "tokens", "input",
          "content", "add_special_tokens", "logprobs", "tools", "suffix", "keep_alive", "load_options"]
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\ud83d", "x\udc00"])
TEXT = st.text(max_size=12) | SURROGATES
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
GOOD = {
    "model": st.sampled_from([GEMMA, "qwen", "", "nope"]) | JSON,
    "prompt": st.sampled_from(["Hello", ["a", "b"], [1, 2, 3], [[1, 2]], [10**9]]) | JSON,
    "messages": st.just([{"role": "user", "content": "Hi"}]) | JSON,
    "max_tokens": st.integers(-3, 6) | JSON,
    "grammar": st.sampled_from(['root ::= "a" | "b"', "", 'root ::= "ꙮ"', "root ::= " + "(" * 500 + '"a"' + ")" * 500])
    | JSON,
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "json_object", "schema": 1},
                                        {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}])
    | JSON,
    "stream": st.booleans() | JSON,
    "tokens": st.lists(st.integers(-5, 300_000), max_size=4) | JSON,
}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "deep", "bytes"]))
    if kind == "deep":
        depth = draw(st.integers(100, 40_000))
        return b'{"model": "gemma3-270m", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    keys = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    body = {key: draw(GOOD.get(key, JSON)) for key in keys}
    for key in ("max_tokens", "max_completion_tokens"):  # keep generation short: this is not a speed test
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 6:
            body[key] = 6
    if "max_tokens" not in body:
        body["max_tokens"] = 4
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def server(gemma_path: Any) -> Iterator[Server]:
    srv = start_server("-m", GEMMA, "--api-key", KEY, "--ctx", "512")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root, headers=AUTH, timeout=120) as c:
        yield c


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=bodies(),
       content_type=st.sampled_from(["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded"]))
def test_fuzzed_bodies_never_get_a_5xx(server: Server, client: httpx.Client, route: tuple[str, str], body: bytes,
                                       content_type: str) -> None:
    method, path = route
    if path.endswith("/unload"):
        return  # would unload the model under test; its body is ignored anyway
    with client.stream(method, path, content=body, headers={"Content-Type": content_type}) as response:
        text = response.read()
    assert response.status_code < 500, (method, path, body[:300], response.status_code, text[:500])
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert text.rstrip().endswith(b"data: [DONE]"), text[-300:]
    assert server.process.poll() is None, server.output()[-3000:]


@pytest.mark.slow
def test_the_server_is_alive_after_the_fuzz(server: Server, client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    done = client.post("/v1/completions", json={"model": GEMMA, "prompt": "One, two,", "max_tokens": 2})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
    code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output[-3000:]
