"""Leased generation streams, and running them off the event loop.

Engines are blocking and hold their model lock while a stream is open, so callers must (1) hold
the pool lease for exactly as long as the stream lives and (2) never iterate an engine on an
event loop. :class:`LeasedStream` does (1): the chunks of ``n`` generations on one leased engine,
releasing the lease once, whether the stream ends, is closed, or is dropped unstarted.
:func:`start_stream` does (2): one thread per request acquires, validates and generates; the
caller awaits chunks. When the caller stops early (client disconnect, task cancellation) the
thread closes the generator between two tokens — the only safe place, since a generator can
only be closed by the thread running it — so the engine lock and the pool slot are freed and
the model's state stays consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from velollm.engine import Chunk, Completion, GenerationRequest, collect_stream

Choice = tuple[int, Chunk]


class LeasedStream:
    """Chunks of several generations, one after the other, on one leased engine: ``(index, chunk)``.

    The first request is validated by the engine when the stream is made (bad requests fail
    before anything is returned); the lease is released exactly once.
    """

    def __init__(self, lease: Any, requests: list[GenerationRequest]) -> None:
        self.lease = lease
        self.engine = lease.engine
        self._requests = requests
        self._released = False
        self._mutex = threading.Lock()
        try:
            self._first = self.engine.stream(requests[0])
        except BaseException:
            self._release()
            raise
        self._gen = self._iterate()

    def _iterate(self) -> Iterator[Choice]:
        for i, request in enumerate(self._requests):
            chunks = self._first if i == 0 else self.engine.stream(request)
            try:
                for chunk in chunks:
                    yield i, chunk
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

    def __iter__(self) -> LeasedStream:
        return self

    def __enter__(self) -> LeasedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> Choice:
        try:
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop generating and release the lease. Call from the thread that iterates."""
        try:
            self._gen.close()
            close = getattr(self._first, "close", None)
            if close is not None:
                close()
        finally:
            self._release()

    def _release(self) -> None:
        with self._mutex:
            if self._released:
                return
            self._released = True
        self.lease.release()

    def __del__(self) -> None:  # a stream dropped unstarted must not keep its pool slot
        with contextlib.suppress(Exception):
            if not self._released:
                self.close()


def open_leased(pool: Any, ref: str, requests: list[GenerationRequest], load_options: dict[str, Any],
                check: Callable[[GenerationRequest, Any], None] | None = None) -> LeasedStream:
    """Acquire ``ref`` from the pool and open a stream of ``requests`` on it (blocking)."""
    lease = pool.acquire(ref, **load_options)
    try:
        if check is not None:
            for request in requests:
                check(request, lease.engine)
        return LeasedStream(lease, requests)
    except BaseException:
        lease.release()
        raise


def collect_choices(choices: Iterable[Choice], n: int, model: str = "") -> list[Completion]:
    """Join ``(index, chunk)`` pairs into one Completion per index."""
    per_index: list[list[Chunk]] = [[] for _ in range(n)]
    for index, chunk in choices:
        per_index[index].append(chunk)
    return [collect_stream(iter(chunks), model=model) for chunks in per_index]


# --- off the event loop ---------------------------------------------------------------------------
_READY, _ITEM, _ERROR, _DONE = 0, 1, 2, 3


class _StreamThread:
    def __init__(self, make_iter: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._make_iter = make_iter
        self._loop = loop
        self._stop = threading.Event()
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="velollm-stream", daemon=True)

    def _put(self, kind: int, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def _run(self) -> None:
        iterator: Iterator[Any] | None = None
        try:
            iterator = self._make_iter()
            self._put(_READY, None)
            if not self._stop.is_set():
                for item in iterator:
                    self._put(_ITEM, item)
                    if self._stop.is_set():
                        break
        except BaseException as exc:  # handed to the consumer, who re-raises it in its own task
            self._put(_ERROR, exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            self.finished.set()
            self._put(_DONE, None)


class AsyncStream:
    """Async iterator over a blocking iterator that lives in its own thread; ``aclose`` stops it."""

    def __init__(self, worker: _StreamThread) -> None:
        self._worker = worker
        self._done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            kind, value = await self._worker.queue.get()
        except BaseException:
            self._worker._stop.set()
            raise
        if kind == _ITEM:
            return value
        self._done = True
        if kind == _ERROR:
            raise value
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._done = True
        self._worker._stop.set()

    @property
    def finished(self) -> threading.Event:
        """Set once the thread has closed the iterator (and so released what it held)."""
        return self._worker.finished

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def start_stream(make_iter: Callable[[], Iterator[Any]]) -> AsyncStream:
    """Run ``make_iter()`` in a new thread; return once it is built, raising what building raised.

    So loading, queueing and validation errors surface here, before a caller commits to a
    streamed answer; errors while iterating surface from the iteration.
    """
    worker = _StreamThread(make_iter, asyncio.get_running_loop())
    worker._thread.start()
    try:
        kind, value = await worker.queue.get()
    except BaseException:
        worker._stop.set()
        raise
    if kind == _ERROR:
        raise value
    return AsyncStream(worker)


async def acollect(stream: AsyncStream, n: int, model: str = "") -> list[Completion]:
    """Await every chunk of a started stream of ``(index, chunk)`` pairs; cancelling stops generation."""
    pairs: list[Choice] = []
    async with stream:
        async for pair in stream:
            pairs.append(pair)
    return collect_choices(pairs, n, model)
