"""A client that goes away stops its generation: observed on the engine itself, not by the clock.

The app runs under uvicorn in this process with a real pool and Gemma 270M; the pool is wrapped so
the test sees each generation's end: closed early (the server cancelled it) or finished (it ran to
max_tokens). The request asks for an endless grammar and 1500 tokens, so a generation that is not
cancelled can only finish with ``finish_reason="length"``, however fast the machine; the earlier
tests passed whenever 1900 tokens took longer than 20 s, which a fast machine (or a GPU) breaks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import serve_in_thread

from velollm.engine import Chunk, GenerationRequest
from velollm.server.app import ServerConfig, create_app

GEMMA = "gemma3-270m"
#: no end at all: only max_tokens (or cancellation) stops it
ENDLESS = 'root ::= ("la " | "lo ") root'
BODY = {"model": GEMMA, "prompt": "Sing:", "max_tokens": 1500, "temperature": 0, "grammar": ENDLESS}

pytestmark = pytest.mark.slow


class _Observed:
    """Delegates to a real engine; notes how each stream ended: 'closed' early or 'finished'."""

    def __init__(self, engine: Any, ends: list[str], started: threading.Event) -> None:
        self._engine, self._ends, self._started = engine, ends, started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        inner = self._engine.stream(request)

        def watch() -> Iterator[Chunk]:
            end = "closed"
            try:
                for chunk in inner:
                    self._started.set()
                    if chunk.finish_reason is not None:
                        end = f"finished ({chunk.finish_reason}, {chunk.usage.completion_tokens} tokens)"
                    yield chunk
            finally:
                inner.close()
                self._ends.append(end)

        return watch()


class _ObservedPool:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.ends: list[str] = []
        self.started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def acquire(self, ref: str, **options: Any) -> Any:
        lease = self._pool.acquire(ref, **options)
        observed = _Observed(lease.engine, self.ends, self.started)

        class Lease:
            engine = observed

            def release(self) -> None:
                lease.release()

        return Lease()

    def wait_end(self, timeout: float = 300) -> str:
        """How the next generation ended (waits for it; the timeout only keeps a broken build from hanging)."""
        deadline = time.monotonic() + timeout
        while not self.ends and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.ends, "the generation never ended"
        return self.ends.pop()


@pytest.fixture(scope="module")
def served(gemma_path: Any) -> Iterator[tuple[str, _ObservedPool]]:
    from velollm.pool import ModelPool

    pool = _ObservedPool(ModelPool())
    app = create_app(ServerConfig(models={GEMMA: GEMMA}, load_options={"n_ctx": 2048}), pool=pool)
    try:
        with serve_in_thread(app) as base:
            # the observer sees a generation that is left alone finish at max_tokens
            done = httpx.post(base + "/v1/completions", json={**BODY, "max_tokens": 8}, timeout=300)
            assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length", done.text
            assert pool.wait_end().startswith("finished (length, 8 tokens)")
            yield base, pool
    finally:
        pool.close()


def test_mid_stream_disconnect_stops_generation(served: tuple[str, _ObservedPool]) -> None:
    base, pool = served
    pool.started.clear()
    with httpx.stream("POST", base + "/v1/completions", json={**BODY, "stream": True}, timeout=300) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:")
            if seen >= 4:
                break  # leaving the block closes the connection mid-stream
    assert pool.wait_end() == "closed"
    after = httpx.post(base + "/v1/completions", json={**BODY, "max_tokens": 3}, timeout=300)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
    assert pool.wait_end().startswith("finished")


def test_client_that_gives_up_on_a_plain_request_stops_its_generation(served: tuple[str, _ObservedPool]) -> None:
    import json
    import socket

    base, pool = served
    pool.started.clear()
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(BODY).encode()
    with socket.create_connection((host, int(port)), timeout=300) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert pool.started.wait(300), "the generation never started"
    # the client gave up (closed its connection) while the server was generating: no clock involved
    assert pool.wait_end() == "closed"
