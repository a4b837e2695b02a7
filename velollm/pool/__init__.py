"""Loading, placing and sharing engines: one process-wide :class:`ModelPool` by default."""

from __future__ import annotations

from velollm.pool.core import Lease, ModelPool, PooledEngine, PoolStatus, get_pool, set_pool
from velollm.pool.placement import Device, MemoryNeeds, PlacementOptions, Plan, place

__all__ = ["Device", "Lease", "MemoryNeeds", "ModelPool", "Plan", "PlacementOptions", "PoolStatus", "PooledEngine",
           "get_pool", "place", "set_pool"]
