"""Leases and turns: who may use a loaded engine, and when.

A :class:`Lease` pins a model in the pool; a *turn* lets one request into the engine. An engine
runs ``max_concurrency`` requests at once (:func:`velollm.engine.engine_concurrency`); the others
wait in a bounded FIFO queue and get :class:`~velollm.errors.QueueFull` or
:class:`~velollm.errors.QueueTimeout` instead of piling up. :class:`TurnQueue` is the pool's half
that hands out turns; :class:`PooledEngine` is the engine view that takes one per model call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from velollm import tools
from velollm.engine import Chunk, Completion, Engine, GenerationRequest, LoadOptions, engine_turn_free_methods
from velollm.errors import EngineClosed, InvalidRequest, QueueFull, QueueTimeout
from velollm.placement import Plan

if TYPE_CHECKING:
    from velollm.pool.pool import ModelPool


class _Ticket:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.granted = False


class _Entry:
    """One (model file, backend, options) in the pool."""

    def __init__(self, key: tuple[str, ...], ref: str, path: Path, keep_alive: float) -> None:
        self.key, self.ref, self.path = key, ref, path
        self.state = "loading"  # loading -> ready -> closed; a failed load is dropped
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.engine: Engine | None = None
        self.plan: Plan | None = None
        self.load_options: LoadOptions | None = None
        self.backend = ""
        self.leases = 0
        self.running = 0
        self.holders: dict[int, int] = {}  # thread id -> turns held (to catch self-deadlock)
        self.waiting: deque[_Ticket] = deque()
        self.slots = 1
        self.requests = 0
        self.keep_alive = keep_alive
        self.loaded_at: float | None = None
        self.last_used = time.monotonic()
        self.expires_at: float | None = None

    @property
    def memory(self) -> int:
        return self.plan.memory_bytes if self.plan is not None and self.plan.accounted else 0

    def idle(self) -> bool:
        return self.state == "ready" and self.leases == 0 and self.running == 0 and not self.waiting


class TurnQueue:
    """The turn half of :class:`~velollm.pool.pool.ModelPool` (it owns ``_cond``, ``_mutex``,
    ``_deferred``, ``queue_size``, ``_settle`` and ``_close_all``)."""

    _cond: threading.Condition
    _mutex: threading.Lock
    _deferred: deque[tuple[str, _Entry, int]]
    queue_size: int

    def _settle(self, entry: _Entry) -> list[_Entry]:
        raise NotImplementedError

    @staticmethod
    def _close_all(entries: list[_Entry]) -> None:
        raise NotImplementedError

    @contextmanager
    def turn(self, entry: _Entry, timeout: float | None) -> Iterator[None]:
        """Hold a turn on the entry's engine for the block (the one bracket every model call uses)."""
        token = self._turn(entry, timeout)
        try:
            yield
        finally:
            self._end_turn(entry, token)

    def _turn(self, entry: _Entry, timeout: float | None) -> int:
        """Wait for this thread's turn on the entry's engine (FIFO, bounded); returns a token."""
        me = threading.get_ident()
        with self._cond:
            if entry.state != "ready":
                raise EngineClosed(f"{entry.path.name} was unloaded from the pool")
            if entry.slots == 1 and entry.holders.get(me):
                raise InvalidRequest("this thread is already generating on this engine (an unfinished stream?)")
            if entry.running < entry.slots and not entry.waiting:
                entry.running += 1
                entry.holders[me] = entry.holders.get(me, 0) + 1
                entry.expires_at = None
                return me
            if len(entry.waiting) >= self.queue_size:
                raise QueueFull(f"{len(entry.waiting)} requests are already waiting for {entry.path.name} "
                                f"(queue_size={self.queue_size}); try again later",
                                queued=len(entry.waiting), queue_size=self.queue_size)
            ticket = _Ticket()
            entry.waiting.append(ticket)
        ticket.event.wait(timeout)
        with self._cond:
            if ticket.granted:
                entry.holders[me] = entry.holders.get(me, 0) + 1
                if entry.state == "ready":
                    return me
                victims = self._end_turn_locked(entry, me)
                error: Exception = EngineClosed(f"{entry.path.name} was unloaded from the pool")
            else:
                with contextlib.suppress(ValueError):
                    entry.waiting.remove(ticket)
                if entry.state != "ready":
                    victims, error = [], EngineClosed(f"{entry.path.name} was unloaded from the pool")
                else:
                    victims = self._settle(entry)
                    error = QueueTimeout(f"waited {timeout:g} s for a turn on {entry.path.name} ({entry.running} "
                                         f"running, {len(entry.waiting)} still queued)", timeout=timeout)
        self._close_all(victims)
        raise error

    def _end_turn(self, entry: _Entry, token: int) -> None:
        with self._cond:
            victims = self._end_turn_locked(entry, token)
        self._close_all(victims)

    def _end_turn_locked(self, entry: _Entry, token: int) -> list[_Entry]:
        count = entry.holders.get(token, 0)
        if count <= 1:
            entry.holders.pop(token, None)
        else:
            entry.holders[token] = count - 1
        entry.requests += 1
        if entry.waiting:  # hand the slot straight to the next in line: FIFO, no barging
            ticket = entry.waiting.popleft()
            ticket.granted = True
            ticket.event.set()
            return []
        entry.running -= 1
        return self._settle(entry)

    def _release(self, lease: Lease) -> None:
        entry = lease.entry
        with self._cond:
            entry.leases -= 1
            victims = self._settle(entry)
        self._close_all(victims)

    def _defer(self, kind: str, entry: _Entry, token: int = 0) -> None:
        """A release from a finalizer: never block there (the lock may be held by this very thread)."""
        if self._mutex.acquire(blocking=False):
            try:
                victims = (self._end_turn_locked(entry, token) if kind == "turn"
                           else self._release_locked(entry))
            finally:
                self._mutex.release()
            self._close_all(victims)
            return
        self._deferred.append((kind, entry, token))
        with contextlib.suppress(RuntimeError):
            threading.Thread(target=self._drain_deferred, daemon=True).start()

    def _release_locked(self, entry: _Entry) -> list[_Entry]:
        entry.leases -= 1
        return self._settle(entry)

    def _drain_deferred(self) -> None:
        while self._deferred:
            try:
                kind, entry, token = self._deferred.popleft()
            except IndexError:
                return
            with self._cond:
                victims = self._end_turn_locked(entry, token) if kind == "turn" else self._release_locked(entry)
            self._close_all(victims)


class Lease:
    """The right to use one engine until ``release`` (or the end of a ``with`` block).

    While any lease on a model is open the pool never evicts it. ``engine`` is the pool's view
    of the engine: each ``generate``/``stream`` waits its turn in the engine's queue.
    """

    def __init__(self, pool: ModelPool, entry: _Entry, timeout: float | None = None) -> None:
        self.pool, self.entry, self.key = pool, entry, entry.key
        self._released = False
        self._release_lock = threading.Lock()
        self.engine = PooledEngine(pool, entry, self, timeout)

    @property
    def plan(self) -> Plan | None:
        return self.entry.plan

    def release(self) -> None:
        with self._release_lock:
            if self._released:
                return
            self._released = True
        self.pool._release(self)

    def __enter__(self) -> Engine:
        return self.engine  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lease dropped without release must not pin the model forever
        if not getattr(self, "_released", True):
            self._released = True
            self.pool._defer("lease", self.entry)


class PooledEngine:
    """An Engine whose requests take turns: at most ``slots`` run at once, the rest queue (FIFO).

    Everything else (attributes, tokenization) passes through to the loaded engine; ``close()``
    releases the lease instead of unloading, since other callers share the model.
    """

    def __init__(self, pool: ModelPool, entry: _Entry, lease: Lease, timeout: float | None) -> None:
        self._pool, self._entry, self._lease, self._timeout = pool, entry, lease, timeout

    @property
    def raw(self) -> Engine:
        """The backend's engine itself (bypasses the queue: only for code that serialises on its own)."""
        engine = self._entry.engine
        if engine is None or self._entry.state != "ready":
            raise EngineClosed(f"{self._entry.path.name} was unloaded from the pool")
        return engine

    # Engine protocol
    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def model_path(self) -> Path:
        return self.raw.model_path

    @property
    def capabilities(self) -> Any:
        return self.raw.capabilities

    @property
    def context_length(self) -> int:
        return self.raw.context_length

    def generate(self, request: GenerationRequest) -> Completion:
        """One turn; tool calling's loop guard runs in it (:func:`velollm.tools.guarded_generate`: every
        route, the server, litellm and ``velollm.LM``, generates through here)."""
        with self._pool.turn(self._entry, self._timeout):
            return tools.guarded_generate(self.raw, request)

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Takes the turn now (so QueueFull/QueueTimeout raise here) and keeps it until the stream ends
        (the loop guard's second try, :func:`velollm.tools.guarded_stream`, included)."""
        token = self._pool._turn(self._entry, self._timeout)
        try:
            inner = tools.guarded_stream(self.raw, request)
        except BaseException:
            self._pool._end_turn(self._entry, token)
            raise
        return _TurnStream(self._pool, self._entry, token, inner)

    def embed(self, texts: list[str], **options: Any) -> list[list[float]]:
        """Embeddings take a turn like generation (velollm.embeddings checks ``capabilities.embeddings`` first)."""
        with self._pool.turn(self._entry, self._timeout):
            return self.raw.embed(texts, **options)  # type: ignore[attr-defined]

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.raw.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.raw.detokenize(tokens)

    def close(self) -> None:
        self._lease.release()

    def __getattr__(self, name: str) -> Any:
        """Other attributes of the backend's engine; its other public methods take a turn too, since
        they run the model. Methods the engine declares turn-free (``turn_free_methods``) pass through."""
        if name.startswith("__") or name in ("_pool", "_entry", "_lease", "_timeout"):
            raise AttributeError(name)
        value = getattr(self.raw, name)
        if (name.startswith("_") or name in engine_turn_free_methods(self.raw) or not callable(value)
                or isinstance(value, type)):
            return value

        @functools.wraps(value)
        def queued(*args: Any, **kwargs: Any) -> Any:
            with self._pool.turn(self._entry, self._timeout):
                return value(*args, **kwargs)

        return queued

    def __repr__(self) -> str:
        return f"<PooledEngine {self._entry.path.name} on {self._entry.backend or '?'} ({self._entry.state})>"


class _TurnStream:
    """A stream that gives its turn back when exhausted, closed, failed or garbage-collected."""

    def __init__(self, pool: ModelPool, entry: _Entry, token: int, inner: Iterator[Chunk]) -> None:
        self._pool, self._entry, self._token, self._inner = pool, entry, token, inner
        self._done = False

    def __iter__(self) -> _TurnStream:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            return next(self._inner)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._pool._end_turn(self._entry, self._token)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._done = True
            with contextlib.suppress(Exception):
                close = getattr(self._inner, "close", None)
                if close is not None:
                    close()
            self._pool._defer("turn", self._entry, self._token)
