"""Moved to :mod:`velollm.placement` (placement is used without a pool); kept for one release."""

from velollm._moved import module_shim

__getattr__ = module_shim("velollm.pool.placement", "velollm.placement")
