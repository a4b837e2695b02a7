"""Moved to :mod:`velollm.placement` (placement is used without a pool); kept for one release.

``Device`` and ``MemoryNeeds`` are part of the backend contract now: :mod:`velollm.engine`.
"""

from typing import Any

from velollm._moved import moved

_CONTRACT = frozenset({"Device", "MemoryNeeds"})


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return moved(f"velollm.pool.placement.{name}", "velollm.engine" if name in _CONTRACT else "velollm.placement", name)
