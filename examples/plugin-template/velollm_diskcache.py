"""velollm-diskcache: a backend plugin that wraps another velollm backend and caches completions.

Registers ``cached-<backend>`` for each local backend it finds (e.g. ``cached-llamacpp-cpu``).
Deterministic requests (``temperature == 0`` or a fixed ``seed``) are answered from an SQLite file
after the first time, across processes — handy while iterating on a DSPy program with greedy
decoding. Everything else passes straight through to the wrapped engine.

This is the template for velollm plugin authors: one module, one ``@hookimpl``, one entry point.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import velollm
from velollm.engine import Chunk, Completion, Engine, GenerationRequest, LoadOptions
from velollm.errors import EngineClosed

#: the velollm plugin API this plugin is written for: another velollm reports it and skips the plugin
VELOLLM_PLUGIN_API = "2"
#: the backends this plugin wraps, if they are registered
WRAPPED = ("llamacpp-cpu", "llamacpp-cuda", "llamacpp-vulkan", "llamacpp-metal", "native-cpu")


def cache_path() -> Path:
    default = Path(os.environ.get("VELOLLM_HOME") or Path.home() / ".cache" / "velollm") / "diskcache.sqlite"
    return Path(os.environ.get("VELOLLM_DISKCACHE_PATH", default))


class CompletionStore:
    """A tiny thread-safe key -> Completion store in SQLite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM completions WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return Completion.model_validate_json(row[0])

    def put(self, key: str, completion: Completion) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?)", (key, completion.model_dump_json()))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEngine:
    """An Engine that answers deterministic requests from the store (same contract as the inner one)."""

    def __init__(self, inner: Engine, store: CompletionStore, identity: str) -> None:
        self.inner, self.store, self.identity = inner, store, identity
        self.name = inner.name
        self.model_path = inner.model_path
        self.capabilities = inner.capabilities
        self.closed = False

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    def _check_open(self) -> None:
        if self.closed:  # a cache hit must not answer for an unloaded model (the contract kit checks this)
            raise EngineClosed(f"engine for {self.name} is closed")

    def _key(self, request: GenerationRequest) -> str | None:
        if request.temperature > 0 and request.seed is None:
            return None  # sampling without a seed is meant to differ each time
        return hashlib.sha256(f"{self.identity}\n{request.model_dump_json()}".encode()).hexdigest()

    def generate(self, request: GenerationRequest) -> Completion:
        self._check_open()
        key = self._key(request)
        cached = self.store.get(key) if key else None
        if cached is not None:
            return cached
        completion = self.inner.generate(request)
        if key:
            self.store.put(key, completion)
        return completion

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        self._check_open()  # before the first chunk is asked for: stream() itself raises
        key = self._key(request)
        cached = self.store.get(key) if key else None
        if cached is not None:
            return iter([Chunk(text=cached.text),
                         Chunk(finish_reason=cached.finish_reason, usage=cached.usage, timings=cached.timings)])
        return self._store_stream(self.inner.stream(request), key)  # the inner engine validates now, not later

    def _store_stream(self, chunks: Iterator[Chunk], key: str | None) -> Iterator[Chunk]:
        parts: list[str] = []
        for chunk in chunks:
            parts.append(chunk.text)
            if key and chunk.finish_reason is not None and chunk.usage is not None:
                extra = {"timings": chunk.timings} if chunk.timings is not None else {}
                self.store.put(key, Completion(text="".join(parts), finish_reason=chunk.finish_reason,
                                               usage=chunk.usage, model=self.name, **extra))
            yield chunk

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.inner.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.inner.detokenize(tokens)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class CachedBackend:
    """``cached-<inner>``: available wherever the wrapped backend is."""

    def __init__(self, inner_name: str) -> None:
        self.inner_name = inner_name
        self.name = f"cached-{inner_name}"

    def _inner(self) -> Any:
        # Looked up when used, not at registration: a hook must not call back into the host.
        return velollm.get_host().backend(self.inner_name)

    def available(self, probe: Any) -> tuple[bool, str]:
        if self.inner_name not in velollm.get_host().backends():
            return False, f"the wrapped backend {self.inner_name} is not installed"
        ok, reason = self._inner().available(probe)
        return ok, f"wraps {self.inner_name}: {reason}"

    # Placement: run only when asked for by name, on the devices of the wrapped backend.
    auto_select = False

    def devices(self, probe: Any) -> list[Any]:
        inner_devices = getattr(self._inner(), "devices", None)
        return inner_devices(probe) if inner_devices else []

    def load(self, model_file: Path, options: LoadOptions) -> CachedEngine:
        inner = self._inner().load(model_file, options)
        stat = Path(model_file).stat()
        identity = f"{Path(model_file).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{options.model_dump_json()}"
        return CachedEngine(inner, CompletionStore(cache_path()), identity)


@velollm.hookimpl
def register_backends(register: Any) -> None:
    for name in WRAPPED:
        register(CachedBackend(name))
