"""Loading, placing and sharing engines: one process-wide :class:`ModelPool` by default."""

from __future__ import annotations

from velollm.pool.core import Lease, ModelPool, get_pool, set_pool

__all__ = ["Lease", "ModelPool", "get_pool", "set_pool"]
