"""velollm: local GGUF models behind DSPy and litellm.

Heavy integrations (DSPy, litellm) are imported on first use, so ``import velollm`` and the
CLI stay fast.
"""

from __future__ import annotations

from typing import Any

from velollm import errors
from velollm.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "probe": ("velollm.hardware", "probe"),
    "resolve": ("velollm.models", "resolve"),
    "pull": ("velollm.models", "pull"),
    "inspect": ("velollm.gguf_info", "inspect"),
    "get_host": ("velollm.host", "get_host"),
    "GenerationRequest": ("velollm.engine", "GenerationRequest"),
    "load_engine": ("velollm.loading", "load_engine"),
}

__all__ = ["__version__", "errors", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'velollm' has no attribute {name!r}")
