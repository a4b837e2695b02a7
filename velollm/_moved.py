"""Old import paths keep working for one release: each warns once, then hands out the new object."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_warned: set[str] = set()


def moved(old: str, new_module: str, name: str) -> Any:
    """``name`` from ``new_module``, with one DeprecationWarning per old path (none for a name that never existed)."""
    value = getattr(importlib.import_module(new_module), name)
    if old not in _warned:
        _warned.add(old)
        warnings.warn(f"{old} moved to {new_module}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=3)
    return value


def module_shim(old: str, new_module: str) -> Any:
    """A module-level ``__getattr__`` forwarding every name of an old module to its new home."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return moved(f"{old}.{name}", new_module, name)

    return __getattr__
