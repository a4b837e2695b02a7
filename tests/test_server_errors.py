"""How the HTTP layer fails: a 500 keeps the keep-alive connection, a stream that breaks ends with [DONE].

These exercise the app's own error plumbing under a real uvicorn, so the engine here is a stub
that fails on purpose (a real model cannot be made to fail on cue); every answer a client can
provoke with a real model is in ``test_server_limits.py``.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import serve_in_thread

from velollm.engine import Capabilities, Chunk, GenerationRequest
from velollm.server.app import ServerConfig, create_app


class _BreakingEngine:
    """Streams one chunk, then fails the way a bug would (not a VeloError)."""

    name = "breaking"
    context_length = 512
    capabilities = Capabilities(chat=True, grammar=True, json_schema=True)

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        yield Chunk(text="partial ")
        raise RuntimeError("the engine broke mid-stream")


class _Lease:
    def __init__(self) -> None:
        self.engine = _BreakingEngine()

    def release(self) -> None:
        pass


class _Pool:
    def acquire(self, ref: str, **options: Any) -> _Lease:
        return _Lease()

    @contextlib.contextmanager
    def engine(self, ref: str, **options: Any) -> Iterator[Any]:
        raise RuntimeError("an unexpected failure inside the pool")
        yield  # pragma: no cover

    def status(self) -> dict[str, Any]:
        return {"models": []}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_in_thread(create_app(ServerConfig(models={"m": "m"}), pool=_Pool()), log_level="critical",
                         timeout=30) as url:
        yield url


def _exchange(sock: socket.socket, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open connection; the status and body of its answer."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"the server closed the connection (read so far: {data[:200]!r})")
        data += part
    header, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError("the server closed the connection mid-answer")
        rest += part
    return int(header.split(b" ")[1]), rest[:length]


def test_a_500_does_not_close_the_keep_alive_connection(base: str) -> None:
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        status, body = _exchange(sock, "POST", "/tokenize", b'{"model": "m", "prompt": "hi"}')
        assert status == 500
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and "unexpected failure" not in error["message"]  # no leak
        # the same connection answers the next request (before: reset, since uvicorn closed it)
        status, body = _exchange(sock, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, _ = _exchange(sock, "POST", "/tokenize", b'{"model": "m", "prompt": "again"}')
        assert status == 500


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": "m", "prompt": "hi", "stream": True}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
])
def test_a_stream_that_fails_midway_sends_an_error_event_then_done(base: str, path: str, body: dict) -> None:
    with httpx.stream("POST", base + path, json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert "partial" in events[0] + events[1]
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "broke" not in error["message"]
    assert events[-1] == "[DONE]", events
