"""The ModelPool: every consumer (DSPy LM, litellm provider, server, CLI) gets engines here.

What it guarantees, and why:

* **One load per model.** N threads asking for a model that is not loaded yet share one load
  (single flight); a failed load is reported to every waiter and forgotten, so the next
  request tries again instead of inheriting the failure.
* **Placement decides how.** Each load is planned by :mod:`velollm.placement` (backend,
  GPU layers, threads, context) from the hardware probe; callers' explicit options win.
* **Leases pin models.** A model with a lease (or a request still running) is never evicted.
  When the last lease ends the model stays for ``keep_alive`` seconds (Ollama's default,
  5 minutes; 0 unloads at once; negative keeps it forever).
* **A memory budget.** Before a load, idle models are evicted least-recently-used first while
  the estimated memory of all loaded models would exceed the budget or ``max_loaded``; if
  only models in use stand in the way, the load waits for one to become idle (bounded).
* **Fair turns.** An engine runs one request at a time (or ``engine.max_concurrency``, e.g. a
  server behind an HTTP API); other requests wait in a bounded FIFO queue and get
  :class:`~velollm.errors.QueueFull` or :class:`~velollm.errors.QueueTimeout` instead of
  piling up without limit.

The pool knows engines only through :mod:`velollm.engine`'s protocols: nothing here is
specific to llama.cpp.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from velollm import loading
from velollm.engine import Engine, LoadOptions, engine_concurrency
from velollm.errors import EngineClosed, InsufficientMemory, InvalidRequest, PoolBusy, validated
from velollm.hardware import HardwareProbe
from velollm.placement import fmt_bytes
from velollm.pool.memory import trim_heap
from velollm.pool.status import (
    DEFAULT_KEEP_ALIVE,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_QUEUE_TIMEOUT,
    ModelStatus,
    PoolStatus,
    default_budget,
    parse_keep_alive,
)
from velollm.pool.turns import Lease, TurnQueue, _Entry

log = logging.getLogger(__name__)


class ModelPool(TurnQueue):
    """Loads models once, shares them between threads, and unloads them under a memory budget.

    ``probe`` may be a :class:`HardwareProbe` (tests inject machines) or a callable returning one;
    ``host`` fixes the plugin host (default: the process-wide one at each load);
    ``placement`` holds extra :class:`~velollm.placement.PlacementOptions` fields.
    """

    def __init__(self, *, memory_budget: int | None = None, max_loaded: int | None = None,
                 keep_alive: float | str | timedelta | None = DEFAULT_KEEP_ALIVE,
                 queue_size: int = DEFAULT_QUEUE_SIZE, queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT,
                 probe: HardwareProbe | Callable[[], HardwareProbe] | None = None, host: Any = None,
                 placement: dict[str, Any] | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise InvalidRequest(f"max_loaded must be at least 1, not {max_loaded}")
        if queue_size < 0:
            raise InvalidRequest(f"queue_size must be >= 0, not {queue_size}")
        self.memory_budget = memory_budget
        self.max_loaded = max_loaded
        self.keep_alive = parse_keep_alive(keep_alive)
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.placement = dict(placement or {})
        self._probe_source = probe
        self._host = host
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._entries: dict[tuple[str, ...], _Entry] = {}
        self._deferred: deque[tuple[str, _Entry, int]] = deque()  # releases from __del__ (lock-free)
        self._reaper: threading.Thread | None = None
        self._stats = {"loads": 0, "load_failures": 0, "unloads": 0, "evictions": 0}

    # --- public API -------------------------------------------------------------------------
    def acquire(self, ref: str, *, backend: str | None = None, keep_alive: float | str | timedelta | None = None,
                timeout: float | None = None, **load_options: Any) -> Lease:
        """A lease on the engine for ``ref``, loading it on first use (once, however many ask).

        ``load_options`` are :class:`~velollm.engine.LoadOptions` fields; those given override
        placement. ``keep_alive`` (seconds or "5m") applies after this lease ends; ``timeout``
        bounds waiting for memory and, for each request on the lease, for its turn.
        """
        options = self._options(load_options)
        keep = parse_keep_alive(keep_alive, self.keep_alive) if keep_alive is not None else None
        wait = self.queue_timeout if timeout is None else timeout
        resolved = loading.resolve(str(ref), host=self._host)
        backend = backend or resolved.backend
        explicit = {name: getattr(options, name) for name in sorted(options.model_fields_set)}
        key = (str(resolved.path), backend or "", json.dumps(explicit, sort_keys=True, default=str))
        self._drain_deferred()
        with self._cond:
            entry = self._entries.get(key)
            owner = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry(key, str(ref), resolved.path, self.keep_alive)
            entry.leases += 1
            entry.expires_at = None
            if keep is not None:
                entry.keep_alive = keep
        if owner:
            try:
                self._load(entry, resolved, backend, options, wait)
            except BaseException as exc:
                self._fail(entry, exc)
                raise
        else:
            entry.ready.wait()
            if entry.error is not None:
                raise entry.error
        return Lease(self, entry, wait)

    @contextmanager
    def engine(self, ref: str, **kwargs: Any) -> Iterator[Engine]:
        """``with pool.engine(ref) as engine:`` — a lease for the length of the block."""
        lease = self.acquire(ref, **kwargs)
        try:
            yield lease.engine
        finally:
            lease.release()

    def status(self) -> PoolStatus:
        """Loaded models with placement, memory, leases, queue depth and last use."""
        self._drain_deferred()
        now, wall = time.monotonic(), time.time()

        def stamp(t: float | None) -> datetime | None:
            return None if t is None else datetime.fromtimestamp(wall - (now - t), tz=timezone.utc)

        with self._cond:
            models = [ModelStatus(
                ref=e.ref, path=str(e.path), backend=e.backend, state=e.state, leases=e.leases, running=e.running,
                queued=len(e.waiting), slots=e.slots, requests=e.requests, keep_alive_s=e.keep_alive,
                loaded_at=stamp(e.loaded_at), last_used=stamp(e.last_used),
                expires_in_s=None if e.expires_at is None else max(e.expires_at - now, 0.0),
                memory_bytes=e.memory, memory_by_device=e.plan.memory_by_device() if e.plan else {},
                load_options=e.load_options.model_dump(mode="json") if e.load_options else {}, plan=e.plan,
            ) for e in self._entries.values()]
            used = sum(e.memory for e in self._entries.values())
            return PoolStatus(models=models, memory_budget=self.memory_budget, memory_used=used,
                              max_loaded=self.max_loaded, keep_alive_s=self.keep_alive, queue_size=self.queue_size,
                              queue_timeout_s=self.queue_timeout, **self._stats)

    def unload(self, ref: str | None = None) -> int:
        """Unload idle models (all, or those loaded for ``ref``); returns how many were unloaded."""
        path = None
        if ref is not None:
            path = str(loading.resolve(str(ref), download=False, host=self._host).path)
        with self._cond:
            victims = [e for e in self._entries.values() if e.idle() and (path is None or e.key[0] == path)]
            for entry in victims:
                self._detach(entry, "unloads")
        self._close_all(victims)
        return len(victims)

    def close(self) -> None:
        """Unload every model now and free its memory; the pool stays usable afterwards.

        Requests still running finish first (engines wait for them in ``close``); leases
        held on closed engines then raise :class:`~velollm.errors.EngineClosed`.
        """
        with self._cond:
            entries = list(self._entries.values())
            for entry in entries:
                if entry.state == "ready":
                    self._detach(entry, "unloads")
                else:  # still loading: the loader closes what it gets
                    self._entries.pop(entry.key, None)
                    entry.state = "closed"
            self._cond.notify_all()
        self._close_all([e for e in entries if e.engine is not None])

    # --- loading ------------------------------------------------------------------------------
    @staticmethod
    def _options(load_options: dict[str, Any]) -> LoadOptions:
        return validated(LoadOptions, load_options, "load options")

    def _probe(self) -> HardwareProbe:
        source = self._probe_source
        if isinstance(source, HardwareProbe):
            return source
        if callable(source):
            return source()
        return loading.probe_machine(self._host)

    def _prepare(self, resolved: Any, backend: str | None, options: LoadOptions) -> Any:
        return loading.prepare(resolved.path, backend=backend, options=options, probe=self._probe(), host=self._host,
                       resolved=resolved, **self.placement)

    def _load(self, entry: _Entry, resolved: Any, backend: str | None, options: LoadOptions,
              wait: float | None) -> None:
        deadline = None if wait is None else time.monotonic() + wait
        prepared = self._make_room(entry, resolved, backend, options, deadline)
        plan = prepared.plan
        log.info("loading %s on %s (n_gpu_layers=%s, n_ctx=%s)", entry.path.name, plan.backend, plan.n_gpu_layers,
                 plan.n_ctx)
        engine = loading.load_prepared(prepared, self._host)
        with self._cond:
            if entry.state == "closed":  # the pool was closed while this model loaded
                orphan = True
            else:
                orphan = False
                entry.engine, entry.state = engine, "ready"
                entry.slots = engine_concurrency(engine)
                entry.loaded_at = entry.last_used = time.monotonic()
                self._stats["loads"] += 1
        if orphan:
            _close_quietly(engine)
            raise EngineClosed(f"the pool was closed while {entry.path.name} was loading")
        entry.ready.set()

    def _make_room(self, entry: _Entry, resolved: Any, backend: str | None, options: LoadOptions,
                   deadline: float | None) -> Any:
        """Plan the load and evict idle models until it fits the budget, free memory and max_loaded."""
        prepared, evicted = None, False
        while True:
            if prepared is None or evicted:
                try:
                    prepared = self._prepare(resolved, backend, options)
                except InsufficientMemory:
                    # idle models may be what fills the memory: free the oldest and plan again
                    if not self._evict_one(entry):
                        raise
                    evicted = True
                    continue
                evicted = False
            need = prepared.plan.memory_bytes if prepared.plan.accounted else 0
            victims: list[_Entry] = []
            with self._cond:
                budget = self.memory_budget
                if budget is None:
                    budget = self.memory_budget = default_budget(self._probe())
                if need > budget:
                    plan = prepared.plan
                    raise InsufficientMemory(
                        f"{entry.path.name} needs about {fmt_bytes(need)} (weights {fmt_bytes(plan.weights_bytes)}, "
                        f"KV cache {fmt_bytes(plan.kv_bytes)}, compute {fmt_bytes(plan.compute_bytes)}) but the "
                        f"pool's memory budget is {fmt_bytes(budget)}", needed=need, budget=budget)
                while True:
                    # loaded models and loads that already reserved their share (not ones still planning)
                    others = [e for e in self._entries.values()
                              if e is not entry and (e.state == "ready" or e.plan is not None)]
                    used = sum(e.memory for e in others)
                    over_budget = used + need > budget
                    over_count = self.max_loaded is not None and len(others) >= self.max_loaded
                    if not over_budget and not over_count:
                        entry.plan = prepared.plan  # reserve: concurrent loads now count this one
                        entry.backend = prepared.plan.backend
                        entry.load_options = prepared.load_options
                        break
                    victim = self._lru_idle(exclude=entry)
                    if victim is not None:
                        self._detach(victim, "evictions")
                        victims.append(victim)
                        continue
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        why = (f"{fmt_bytes(used)} of the {fmt_bytes(budget)} budget is held by models in use and "
                               f"{entry.path.name} needs {fmt_bytes(need)}") if over_budget else (
                            f"max_loaded={self.max_loaded} models are loaded and in use")
                        raise PoolBusy(f"cannot load {entry.path.name}: {why}; none became idle in time",
                                       needed=need, used=used, budget=budget)
                    self._cond.wait(remaining)
            if victims:
                self._close_all(victims)
                if prepared.plan.accounted:
                    evicted = True  # memory was freed: plan again, the model may now get more GPU layers
                    entry.plan = None
                    continue
            return prepared

    def _evict_one(self, entry: _Entry) -> bool:
        with self._cond:
            victim = self._lru_idle(exclude=entry)
            if victim is None:
                return False
            self._detach(victim, "evictions")
        self._close_all([victim])
        return True

    def _lru_idle(self, exclude: _Entry) -> _Entry | None:
        idle = [e for e in self._entries.values() if e is not exclude and e.idle()]
        return min(idle, key=lambda e: e.last_used) if idle else None

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        with self._cond:
            entry.error = exc
            if entry.state != "closed":
                entry.state = "closed"
                self._stats["load_failures"] += 1
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]  # forget the failure: the next request tries again
            self._cond.notify_all()
        entry.ready.set()

    # --- unloading ----------------------------------------------------------------------------
    def _detach(self, entry: _Entry, reason: str) -> None:
        """Remove an entry (caller holds the lock); its engine is closed later, outside the lock."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        entry.state = "closed"
        self._stats[reason] += 1
        while entry.waiting:  # wake queued requests: they raise EngineClosed
            entry.waiting.popleft().event.set()
        self._cond.notify_all()

    @staticmethod
    def _close_all(entries: list[_Entry]) -> None:
        closed = False
        for entry in entries:
            if entry.engine is not None:
                _close_quietly(entry.engine)
                closed = True
        if closed:
            trim_heap()

    def _settle(self, entry: _Entry) -> list[_Entry]:
        """After a lease or a turn ends (lock held): unload or schedule expiry if now idle."""
        entry.last_used = time.monotonic()
        self._cond.notify_all()
        if not entry.idle():
            return []
        if entry.keep_alive == 0:
            self._detach(entry, "unloads")
            return [entry]
        if entry.keep_alive > 0:
            entry.expires_at = entry.last_used + entry.keep_alive
            self._start_reaper()
        return []

    def _start_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="velollm-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Unload models whose keep_alive ran out; exits when nothing is waiting to expire."""
        while True:
            self._drain_deferred()
            with self._cond:
                now = time.monotonic()
                expired = [e for e in self._entries.values()
                           if e.idle() and e.expires_at is not None and e.expires_at <= now]
                for entry in expired:
                    self._detach(entry, "unloads")
                pending = [e.expires_at for e in self._entries.values() if e.idle() and e.expires_at is not None]
                if not expired:
                    if not pending and not self._deferred:
                        self._reaper = None
                        return
                    timeout = min(pending) - now if pending else 1.0
                    if self._deferred:
                        timeout = min(timeout, 1.0)
                    self._cond.wait(max(timeout, 0.0))
            self._close_all(expired)


def _close_quietly(engine: Engine) -> None:
    try:
        engine.close()
    except Exception as exc:  # a failing close must not stop the others from closing
        log.warning("closing %r failed: %s: %s", engine, type(exc).__name__, exc)


# --- the process-wide pool -----------------------------------------------------------------------
_pool: ModelPool | None = None
_pool_lock = threading.Lock()
_atexit_registered = False


def _close_at_exit(timeout: float = 10.0) -> None:
    """Free engines at exit, but never hang there: a request still running in a daemon thread
    would make ``close`` wait for it."""
    pool = _pool
    if pool is not None:
        closer = threading.Thread(target=pool.close, name="velollm-pool-close", daemon=True)
        closer.start()
        closer.join(timeout)


def get_pool() -> ModelPool:
    """The process-wide pool (closed at interpreter exit, so engines free their memory cleanly)."""
    global _pool, _atexit_registered
    with _pool_lock:
        if _pool is None:
            _pool = ModelPool()
        if not _atexit_registered:
            atexit.register(_close_at_exit)
            _atexit_registered = True
        return _pool


def set_pool(pool: ModelPool | None) -> ModelPool | None:
    """Replace the process-wide pool (tests, applications with their own limits); returns the old one."""
    global _pool
    with _pool_lock:
        old, _pool = _pool, pool
        return old
