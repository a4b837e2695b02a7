"""The ModelPool: every consumer (DSPy LM, litellm provider, server, CLI) gets engines here.

Minimal first version: loads each (model, backend, options) once and hands out leases.
Placement, eviction, keep-alive and per-engine queues build on this API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from velollm.engine import Engine, LoadOptions


class Lease:
    """The right to use one engine until ``release`` (or the end of a ``with`` block)."""

    def __init__(self, pool: ModelPool, key: tuple[Any, ...], engine: Engine) -> None:
        self.pool, self.key, self.engine = pool, key, engine
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self)

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[tuple[Any, ...], Engine] = {}

    def acquire(self, ref: str, *, backend: str | None = None, **options: Any) -> Lease:
        """A lease on the engine for ``ref``, loading it on first use."""
        from velollm.loading import load_engine

        load_options = LoadOptions(**options)
        key = (ref, backend, load_options.model_dump_json())
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = load_engine(ref, backend=backend, options=load_options)
        return Lease(self, key, engine)

    @contextmanager
    def engine(self, ref: str, **kwargs: Any) -> Iterator[Engine]:
        lease = self.acquire(ref, **kwargs)
        try:
            yield lease.engine
        finally:
            lease.release()

    def _release(self, lease: Lease) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()


_pool: ModelPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> ModelPool:
    """The process-wide pool."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ModelPool()
        return _pool


def set_pool(pool: ModelPool | None) -> ModelPool | None:
    global _pool
    with _pool_lock:
        old, _pool = _pool, pool
        return old
