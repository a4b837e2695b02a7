"""Loading and sharing engines: one process-wide :class:`ModelPool` by default.

``pool.py`` is the pool itself, ``turns.py`` its leases and turn queue, ``status.py`` what it reports
(and keep-alive durations), ``streams.py`` lease-holding streams for async callers.
"""

from __future__ import annotations

from typing import Any

from velollm.pool.pool import ModelPool, get_pool, set_pool
from velollm.pool.status import ModelStatus, PoolStatus
from velollm.pool.turns import Lease, PooledEngine

__all__ = ["Lease", "ModelPool", "ModelStatus", "PoolStatus", "PooledEngine", "get_pool", "set_pool"]

_MOVED = {"Device": "velollm.engine", "MemoryNeeds": "velollm.engine", "PlacementOptions": "velollm.placement",
          "Plan": "velollm.placement", "place": "velollm.placement"}


def __getattr__(name: str) -> Any:
    """Names that moved out of the pool keep working for one release, with a warning."""
    if name in _MOVED:
        from velollm._moved import moved

        return moved(f"velollm.pool.{name}", _MOVED[name], name)
    raise AttributeError(f"module 'velollm.pool' has no attribute {name!r}")
